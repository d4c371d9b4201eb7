// The CUDA runtime API for kernels run on the CPU (cuda_emu.h): one emulated device with
// KVQ_EMU_SMS multiprocessors (default 4) and H100 limits; the threads of a block take their turns
// in an order that differs between blocks (warps shuffled, lanes descending in half of them;
// KVQ_EMU_IN_ORDER=1: thread order everywhere); device memory is host memory filled
// with 0xFF on allocation (NaN as fp16 / fp32, as uninitialized device memory may be) between
// guard bands that every launch checks (and every block its dynamic shared memory's); streams
// and events are synchronous (every operation completes before its call returns). Only the calls
// the project makes are here; anything else fails to link rather than pretending.
// cp.async and ldmatrix operands the GPU would fault on fail the launch after the block that used
// them (plain loads and stores have only the guard bands): the first one is printed and returned
// as cudaErrorMisalignedAddress or cudaErrorIllegalAddress, the bad copy or row itself skipped.
//   - cp.async: the destination 16-byte aligned, its 16 bytes inside the block's dynamic shared
//     memory (no kernel copies into static __shared__ variables, which are host statics here);
//     unless src-size is 0 (zero fill, nothing read), the source 16-byte aligned and its bytes
//     inside one device allocation (pinned host memory, readable on the GPU, is not a source any
//     kernel uses: it fails here as a pointer mix-up);
//   - ldmatrix: every row address 16-byte aligned and, near the dynamic shared memory (inside it
//     or its guard bands), its 16 bytes inside it (static __shared__ rows: alignment only).
#include "cuda_emu.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvq_emu {
namespace {

constexpr int kMaxSmemOptin = 232448;  // 227 KB, sm_90
constexpr int kMaxThreads = 1024;

struct Pending {
  void* dst;
  uint8_t bytes[16];
};

struct ThreadAsync {
  std::vector<Pending> open;                // issued since the last commit
  std::deque<std::vector<Pending>> groups;  // committed, not yet landed, oldest first
  uint32_t commits = 0;                     // groups committed so far (the open group's number)
};

// An mbarrier: its expected arrivals, those still missing in the current phase, the transaction
// bytes expected minus those landed, the current phase's parity, and the bulk copies signalling it.
struct BulkPending {
  uint8_t* dst;
  std::vector<uint8_t> bytes;
};
struct Mbar {
  int count = 0;
  int pending = 0;
  long long tx = 0;
  uint32_t phase = 0;
  long long tries = 0;  // failed tries of the current phase
  std::vector<BulkPending> copies;
};

// A 32-byte global sector read by a warp's copies of one group (lanes commit in step).
struct SectorKey {
  uintptr_t sector;
  uint32_t warp, group;
  bool operator==(const SectorKey& o) const { return sector == o.sector && warp == o.warp && group == o.group; }
};
struct SectorKeyHash {
  size_t operator()(const SectorKey& k) const {
    return std::hash<uintptr_t>()(k.sector) ^ (size_t{k.group} * 0x9E3779B97F4A7C15ull) ^ (size_t{k.warp} << 56);
  }
};

// A device allocation as a launch saw it when it started.
struct Alloc {
  uintptr_t begin;
  size_t size;
};

// The dynamic shared memory's alignment is its std::vector's (kGuard keeps it), which the checks
// below take as the GPU's.
static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= 16, "dynamic shared memory 16-byte aligned");

struct GridState {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<uint8_t> dynamic_smem;  // guard band, smem_bytes, guard band
  size_t smem_bytes = 0;
  std::vector<ThreadAsync> async;  // per thread of the running block
  // per sector a warp's copies of one group read: the 32-byte unit of dynamic shared memory its
  // first 16 bytes went to (CpAsyncOk: the other 16 must go to the same unit)
  std::unordered_map<SectorKey, long long, SectorKeyHash> sector_units;
  std::unordered_map<uintptr_t, Mbar> mbars;  // the running block's, by address
  // The device allocations at the launch's start, by address: cp.async sources are looked up here
  // without a lock. Other host threads may allocate and free meanwhile (the store's lanes grow
  // their own buffers), but not what this launch reads: its lane's buffers and the arena.
  std::vector<Alloc> allocs;
  size_t last_alloc = 0;  // where the last cp.async source was (the next one nearly always is)
  cudaError_t error = cudaSuccess;  // the launch's first bad access, and what it was
  std::string error_message;
  bool pdl_model = false;  // programmatic dependent launch emulated (one stream at most in the process)
  bool pre_phase = false;  // a dependent's blocks before its primary grid completed (GridDependencyWait sets aside)
  bool snapshot = false;   // this grid called GridDependentsLaunch: g_pdl.before is its start
  uint64_t late_block = 0;  // the block whose late call took the image (GridDependentsLaunch(true))
};

GridState* g_grid = nullptr;

// Programmatic dependent launch, adversarially: a grid that calls GridDependentsLaunch keeps an
// image of device memory as it started (before its first write); when the next operation in the
// process is a launch with the attribute on the same stream, that launch's blocks run first on
// that image, as if all of them ran before the primary grid wrote anything: a block that calls
// GridDependencyWait is set aside (its threads end there) and runs after the primary's writes are
// back. So a block that skips the wait and reads what the primary writes reads the old bytes, and
// a byte written by both grids fails the launch. Any other memory operation or launch in between
// ends the window (as on the GPU, where it would serialize them). Only while at most one stream
// exists: the store's lanes (several streams on several host threads) launch plainly here; and not
// with KVQ_EMU_PDL=0 (the benchmark's smoke tests: every image copies all device memory).
struct PdlImage {
  uint8_t* p;
  std::vector<uint8_t> bytes;
};
struct PdlWindow {
  bool armed = false;
  cudaStream_t stream = nullptr;
  uint64_t epoch = 0;            // g_mem_epoch when the image was taken
  std::vector<PdlImage> before;  // every device allocation as the primary grid started
};
PdlWindow g_pdl;                         // under g_launch_mu
std::atomic<uint64_t> g_mem_epoch{0};    // bumped by every host-side allocation, free, copy or set
std::atomic<int> g_live_streams{0};
std::atomic<uint64_t> g_pdl_early_launches{0};  // launches whose early blocks ran before their primary's writes
std::mutex g_launch_mu;  // one grid at a time, process-wide (static __shared__ variables)

// Guard bands: kGuard bytes of kGuardByte before and after every device allocation and around a
// block's dynamic shared memory, checked after every block (shared) and every launch (device
// memory): a write past either end fails the launch, as compute-sanitizer's memcheck would.
constexpr size_t kGuard = 256;  // keeps the 256-byte alignment of cudaMalloc
constexpr uint8_t kGuardByte = 0xA5;

std::mutex g_mem_mu;
std::map<void*, size_t> g_device_allocs;  // user pointer -> size
std::set<void*> g_host_allocs;
thread_local cudaError_t t_last_error = cudaSuccess;

cudaError_t Fail(cudaError_t e) {
  t_last_error = e;
  return e;
}

bool GuardIntact(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i] != kGuardByte) return false;
  return true;
}

int CurrentThread() { return kvq::cuda::warp::CurrentBlock()->thread(); }

void Land(const Pending& p) { std::memcpy(p.dst, p.bytes, 16); }

uintptr_t Addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }

// Records the launch's first bad access (RunGrid fails the launch with e after the block) and
// returns false: the caller skips the access, so the block runs on without touching memory it
// must not.
__attribute__((format(printf, 2, 3))) bool Bad(cudaError_t e, const char* fmt, ...) {
  GridState& st = *g_grid;
  if (st.error != cudaSuccess) return false;
  char what[256];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(what, sizeof(what), fmt, ap);
  va_end(ap);
  char where[96];
  std::snprintf(where, sizeof(where), "block (%u, %u, %u) thread %d: ", st.block_idx.x, st.block_idx.y,
                st.block_idx.z, CurrentThread());
  st.error = e;
  st.error_message = std::string(where) + what;
  return false;
}

// An address's offset from the start of the block's dynamic shared memory (negative before it).
long long SmemOffset(uintptr_t p) { return static_cast<long long>(p - Addr(DynamicShared())); }

// [p, p + n) inside the block's dynamic shared memory.
bool InDynamicShared(uintptr_t p, size_t n) {
  const long long off = SmemOffset(p);
  return off >= 0 && size_t(off) + n <= g_grid->smem_bytes;
}

// The launch's device allocation at or below p (the last one found, tried first), or nullptr.
const Alloc* AllocBelow(uintptr_t p) {
  GridState& st = *g_grid;
  if (st.last_alloc < st.allocs.size()) {
    const Alloc& a = st.allocs[st.last_alloc];
    if (p >= a.begin && p - a.begin < a.size) return &a;
  }
  const auto it = std::upper_bound(st.allocs.begin(), st.allocs.end(), p,
                                   [](uintptr_t v, const Alloc& a) { return v < a.begin; });
  if (it == st.allocs.begin()) return nullptr;
  st.last_alloc = size_t(it - st.allocs.begin()) - 1;
  return &st.allocs[st.last_alloc];
}

// cp.async's operands as the GPU requires them (see the header comment).
bool CpAsyncOk(uintptr_t dst, uintptr_t src, int n) {
  if (dst % 16 != 0)
    return Bad(cudaErrorMisalignedAddress, "cp.async destination %#zx not 16-byte aligned (%lld bytes from the start "
               "of dynamic shared memory)", size_t(dst), SmemOffset(dst));
  if (!InDynamicShared(dst, 16))
    return Bad(cudaErrorIllegalAddress, "cp.async destination %#zx: its 16 bytes at offset %lld not inside the %zu "
               "bytes of dynamic shared memory", size_t(dst), SmemOffset(dst), g_grid->smem_bytes);
  if (n == 0) return true;  // zero fill: the source is not read
  if (src % 16 != 0) return Bad(cudaErrorMisalignedAddress, "cp.async source %#zx not 16-byte aligned", size_t(src));
  const Alloc* a = AllocBelow(src);
  if (!a)
    return Bad(cudaErrorIllegalAddress, "cp.async source %#zx: its %d bytes in no device allocation", size_t(src), n);
  if (src - a->begin + size_t(n) > a->size)
    return Bad(cudaErrorIllegalAddress, "cp.async source %#zx: its %d bytes at offset %zu not inside the device "
               "allocation of %zu bytes at %#zx", size_t(src), n, size_t(src - a->begin), a->size, size_t(a->begin));
  // A global sector whose two halves a warp copies (in one group) to two 32-byte units of shared
  // memory is fetched from L2 twice: the one-row decode rings, 16 bytes off a sector, read at 0.88x
  // (H100, docs/gpu_notes.md). The units count from the dynamic shared memory's start, which the
  // decode kernel declares 128-byte aligned.
  const int thread = CurrentThread();
  const SectorKey key{src / 32, uint32_t(thread / 32), g_grid->async[size_t(thread)].commits};
  const long long unit = SmemOffset(dst) / 32;
  const auto [it, fresh] = g_grid->sector_units.try_emplace(key, unit);
  if (!fresh && it->second != unit)
    return Bad(cudaErrorLaunchFailure, "cp.async source %#zx: its 32-byte sector goes to two 32-byte units of shared "
               "memory (offsets %lld and %lld) in one copy group of the warp, a sector the GPU fetches twice",
               size_t(src), it->second * 32, unit * 32);
  return true;
}

// An ldmatrix row address as the GPU requires it (see the header comment).
bool LdMatrixRowOk(uintptr_t row) {
  const long long off = SmemOffset(row);
  if (row % 16 != 0)
    return Bad(cudaErrorMisalignedAddress, "ldmatrix row address %#zx not 16-byte aligned (%lld bytes from the start "
               "of dynamic shared memory)", size_t(row), off);
  const long long guard = static_cast<long long>(kGuard);
  if (off >= -guard && off < static_cast<long long>(g_grid->smem_bytes) + guard && !InDynamicShared(row, 16))
    return Bad(cudaErrorIllegalAddress, "ldmatrix row address %#zx: its 16 bytes at offset %lld not inside the %zu "
               "bytes of dynamic shared memory", size_t(row), off, g_grid->smem_bytes);
  return true;
}

}  // namespace

uint3 ThreadIdx() {
  const int t = CurrentThread();
  const dim3 b = g_grid->block;
  return make_uint3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
}
uint3 BlockIdx() { return g_grid->block_idx; }
dim3 BlockDim() { return g_grid->block; }
dim3 GridDim() { return g_grid->grid; }
uint8_t* DynamicShared() { return g_grid->dynamic_smem.data() + kGuard; }

cudaError_t RunGrid(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream, const std::function<void()>& body,
                    bool pdl) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535)
    return Fail(cudaErrorInvalidConfiguration);
  if (dynamic_smem > size_t{kMaxSmemOptin}) return Fail(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(g_launch_mu);
  static const bool in_order = std::getenv("KVQ_EMU_IN_ORDER") != nullptr;
  GridState st;
  st.grid = grid;
  st.block = block;
  st.smem_bytes = dynamic_smem;
  static const bool pdl_off = std::getenv("KVQ_EMU_PDL") != nullptr && std::string(std::getenv("KVQ_EMU_PDL")) == "0";
  st.pdl_model = !pdl_off && g_live_streams.load() <= 1;
  {
    std::lock_guard<std::mutex> mem_lock(g_mem_mu);
    st.allocs.reserve(g_device_allocs.size());
    for (const auto& [ptr, size] : g_device_allocs) st.allocs.push_back({Addr(ptr), size});
  }
  // A programmatic dependent of the grid before it in the stream, nothing else in between: its
  // blocks first run on device memory as it was when that grid started, those that reach
  // GridDependencyWait are set aside, the others complete (see PdlWindow).
  const bool early = pdl && g_pdl.armed && g_pdl.stream == stream && g_pdl.epoch == g_mem_epoch.load() && st.pdl_model;
  g_pdl.armed = false;
  if (!early) g_pdl.before.clear();
  std::vector<std::vector<uint8_t>> after;  // device memory after the primary grid
  if (early) {
    after.reserve(g_pdl.before.size());
    for (const PdlImage& im : g_pdl.before) {
      after.emplace_back(im.p, im.p + im.bytes.size());
      std::memcpy(im.p, im.bytes.data(), im.bytes.size());
    }
    st.pre_phase = true;
    ++g_pdl_early_launches;
  }
  g_grid = &st;
  auto run_block = [&](uint3 idx, int* abandoned) -> cudaError_t {
    const unsigned x = idx.x, y = idx.y, z = idx.z;
    st.block_idx = idx;
    st.dynamic_smem.assign(dynamic_smem + 2 * kGuard, 0xFF);
    std::memset(st.dynamic_smem.data(), kGuardByte, kGuard);
    std::memset(st.dynamic_smem.data() + kGuard + dynamic_smem, kGuardByte, kGuard);
    st.async.assign(threads, ThreadAsync{});
    st.sector_units.clear();
    st.mbars.clear();
    // every block takes its turns in another order (seeded by its place in the grid)
    const uint32_t seed = in_order ? 0u : 0x9E3779B9u * (1u + x + grid.x * (y + grid.y * z));
    *abandoned = kvq::cuda::warp::RunBlock(static_cast<int>(threads), [&](int) { body(); }, seed);
    if (*abandoned != 0 && uint64_t(*abandoned) != threads && st.error == cudaSuccess) {
      st.error = cudaErrorLaunchFailure;
      st.error_message = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) +
                         "): GridDependencyWait reached by " + std::to_string(*abandoned) + " of its " +
                         std::to_string(threads) + " threads (the emulation needs it block-uniform)";
    }
    for (const auto& [addr, bar] : st.mbars)
      if (!bar.copies.empty() && st.error == cudaSuccess) {
        st.error = cudaErrorLaunchFailure;
        st.error_message = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) +
                           "): " + std::to_string(bar.copies.size()) + " bulk copies to the mbarrier at offset " +
                           std::to_string(SmemOffset(addr)) + " still in flight when the block ended";
      }
    if (st.error != cudaSuccess) {
      std::fprintf(stderr, "emulated launch: %s\n", st.error_message.c_str());
      return st.error;
    }
    if (!GuardIntact(st.dynamic_smem.data(), kGuard) ||
        !GuardIntact(st.dynamic_smem.data() + kGuard + dynamic_smem, kGuard)) {
      std::fprintf(stderr, "emulated launch: block (%u, %u, %u) wrote outside its %zu bytes of dynamic shared memory\n",
                   x, y, z, dynamic_smem);
      return cudaErrorLaunchFailure;
    }
    return cudaSuccess;
  };
  // After the early blocks: every byte they changed stays, every other byte takes the primary
  // grid's value; a byte both changed (differently) is a race between the two grids.
  auto join_primary = [&]() -> bool {
    bool ok = true;
    for (size_t i = 0; i < g_pdl.before.size(); ++i) {
      uint8_t* cur = g_pdl.before[i].p;
      const uint8_t* was = g_pdl.before[i].bytes.data();
      const uint8_t* prim = after[i].data();
      for (size_t j = 0; j < after[i].size(); ++j) {
        if (cur[j] == was[j]) {
          cur[j] = prim[j];
        } else if (prim[j] != was[j] && prim[j] != cur[j] && ok) {
          std::fprintf(stderr, "emulated launch: byte %zu of the device allocation at %p written by both a "
                       "programmatic dependent's block that did not wait and the grid it depends on\n", j,
                       static_cast<void*>(cur));
          ok = false;
        }
      }
    }
    g_pdl.before.clear();
    return ok;
  };
  cudaError_t result = cudaSuccess;
  std::vector<uint3> waited;
  for (unsigned z = 0; z < grid.z && result == cudaSuccess; ++z)
    for (unsigned y = 0; y < grid.y && result == cudaSuccess; ++y)
      for (unsigned x = 0; x < grid.x && result == cudaSuccess; ++x) {
        int abandoned = 0;
        result = run_block(make_uint3(x, y, z), &abandoned);
        if (abandoned > 0) waited.push_back(make_uint3(x, y, z));
      }
  if (early) {
    st.pre_phase = false;
    if (!join_primary() && result == cudaSuccess) result = cudaErrorLaunchFailure;
    for (size_t i = 0; i < waited.size() && result == cudaSuccess; ++i) {
      int abandoned = 0;
      result = run_block(waited[i], &abandoned);
    }
  }
  g_grid = nullptr;
  if (result != cudaSuccess) {
    g_pdl.before.clear();
    return Fail(result);
  }
  if (st.snapshot) {  // this grid let its dependents launch: the next launch in the stream may be one
    g_pdl.armed = true;
    g_pdl.stream = stream;
  }
  std::lock_guard<std::mutex> mem_lock(g_mem_mu);
  for (const auto& [ptr, size] : g_device_allocs) {
    const uint8_t* u = static_cast<const uint8_t*>(ptr);
    if (!GuardIntact(u - kGuard, kGuard) || !GuardIntact(u + size, kGuard)) {
      std::fprintf(stderr, "emulated launch: a write outside the device allocation of %zu bytes at %p\n", size, ptr);
      return Fail(cudaErrorLaunchFailure);
    }
  }
  return cudaSuccess;
}

// The grid's first call (before any of its writes: the kernel's first statement) keeps an image of
// device memory for a programmatic dependent. A late call (after the block's own wait, where a
// block may have written before it) keeps the image as of the last block's call instead, since
// the GPU launches the dependent only once every block has called it; calls from blocks that run
// before their own primary's writes (pre_phase) take none: the blocks set aside at their wait
// call it after those writes are back.
void GridDependentsLaunch(bool late) {
  GridState& st = *g_grid;
  if (!st.pdl_model) return;
  if (late) {
    if (st.pre_phase) return;
    const uint64_t block = st.block_idx.x + uint64_t{st.grid.x} * (st.block_idx.y + uint64_t{st.grid.y} * st.block_idx.z);
    if (st.snapshot && st.late_block == block) return;  // once per block (every thread calls it)
    st.late_block = block;
  } else if (st.snapshot) {
    return;
  }
  st.snapshot = true;
  g_pdl.before.clear();
  std::lock_guard<std::mutex> mem_lock(g_mem_mu);
  for (const auto& [ptr, size] : g_device_allocs) {
    uint8_t* u = static_cast<uint8_t*>(ptr);
    g_pdl.before.push_back({u, std::vector<uint8_t>(u, u + size)});
  }
  g_pdl.epoch = g_mem_epoch.load();
}
void GridDependencyWait() {
  if (g_grid->pre_phase) kvq::cuda::warp::CurrentBlock()->Abandon();
}
uint64_t PdlEarlyLaunches() { return g_pdl_early_launches.load(); }

std::atomic<uint64_t> g_float_mmas{0};  // warp-wide fp16 / bf16 mma instructions (MmaM16N8K16)
uint64_t FloatMmas() { return g_float_mmas.load(); }

void LaunchError(const char* what) { Bad(cudaErrorLaunchFailure, "%s", what); }

void CpAsync(void* dst, const void* src, int n) {
  if (!CpAsyncOk(Addr(dst), Addr(src), n)) return;
  Pending p;
  p.dst = dst;
  std::memset(p.bytes, 0, sizeof(p.bytes));
  if (n > 0) std::memcpy(p.bytes, src, size_t(n));
  g_grid->async[size_t(CurrentThread())].open.push_back(p);
}
namespace {

// The initialized mbarrier at bar, or nullptr after reporting the misuse.
Mbar* FindMbar(const uint64_t* bar, const char* op) {
  const auto it = g_grid->mbars.find(Addr(bar));
  if (it == g_grid->mbars.end()) {
    Bad(cudaErrorLaunchFailure, "%s on %#zx (offset %lld), not an initialized mbarrier", op, size_t(Addr(bar)),
        SmemOffset(Addr(bar)));
    return nullptr;
  }
  return &it->second;
}

}  // namespace

void MbarInit(uint64_t* bar, int count) {
  if (Addr(bar) % 8 != 0 || !InDynamicShared(Addr(bar), 8)) {
    Bad(cudaErrorMisalignedAddress, "mbarrier.init at %#zx (offset %lld): not 8-byte aligned inside the %zu bytes of "
        "dynamic shared memory", size_t(Addr(bar)), SmemOffset(Addr(bar)), g_grid->smem_bytes);
    return;
  }
  Mbar& m = g_grid->mbars[Addr(bar)];
  if (!m.copies.empty()) {
    Bad(cudaErrorLaunchFailure, "mbarrier.init at offset %lld with bulk copies in flight", SmemOffset(Addr(bar)));
    return;
  }
  m = Mbar{};
  m.count = m.pending = count;
  std::memset(bar, 0, 8);  // the barrier's word, as the kernel's other accesses would see it change
}

void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  Mbar* m = FindMbar(bar, "mbarrier.arrive.expect_tx");
  if (!m) return;
  if (m->pending == 0) {
    Bad(cudaErrorLaunchFailure, "mbarrier.arrive at offset %lld: more arrivals than its count %d in one phase",
        SmemOffset(Addr(bar)), m->count);
    return;
  }
  --m->pending;
  m->tx += bytes;
}

void BulkCopy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  const uintptr_t d = Addr(dst), s = Addr(src);
  if (bytes == 0 || bytes % 16 != 0) {
    Bad(cudaErrorInvalidValue, "cp.async.bulk of %u bytes: not a positive multiple of 16", bytes);
    return;
  }
  if (d % 16 != 0 || s % 16 != 0) {
    Bad(cudaErrorMisalignedAddress, "cp.async.bulk from %#zx to %#zx (offset %lld): not 16-byte aligned", size_t(s),
        size_t(d), SmemOffset(d));
    return;
  }
  if (!InDynamicShared(d, bytes)) {
    Bad(cudaErrorIllegalAddress, "cp.async.bulk destination offset %lld: its %u bytes not inside the %zu bytes of "
        "dynamic shared memory", SmemOffset(d), bytes, g_grid->smem_bytes);
    return;
  }
  const Alloc* a = AllocBelow(s);
  if (!a || s - a->begin + bytes > a->size) {
    Bad(cudaErrorIllegalAddress, "cp.async.bulk source %#zx: its %u bytes not inside one device allocation", size_t(s),
        bytes);
    return;
  }
  Mbar* m = FindMbar(bar, "cp.async.bulk's complete_tx");
  if (!m) return;
  const uint8_t* from = static_cast<const uint8_t*>(src);
  m->copies.push_back({static_cast<uint8_t*>(dst), std::vector<uint8_t>(from, from + bytes)});
}

bool MbarTryWait(uint64_t* bar, uint32_t parity) {
  Mbar* m = FindMbar(bar, "mbarrier.try_wait.parity");
  if (!m) return true;
  if ((m->phase & 1u) != (parity & 1u)) return true;  // that phase completed before
  if (m->pending > 0) {
    if (++m->tries > 1000000) {
      Bad(cudaErrorLaunchFailure, "mbarrier wait at offset %lld: %d of %d arrivals missing in the phase it waits for, "
          "after a million tries (a hang on the GPU)", SmemOffset(Addr(bar)), m->pending, m->count);
      return true;
    }
    return false;
  }
  long long landed = 0;
  for (const BulkPending& c : m->copies) {
    std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
    landed += static_cast<long long>(c.bytes.size());
  }
  m->copies.clear();
  if (landed != m->tx) {
    Bad(cudaErrorLaunchFailure, "mbarrier wait at offset %lld: %lld bytes expected, the copies brought %lld (on the "
        "GPU a hang, or a phase that completes before its last copy)", SmemOffset(Addr(bar)), m->tx, landed);
    return true;
  }
  m->tx = 0;
  m->tries = 0;
  m->pending = m->count;
  m->phase ^= 1u;
  return true;
}

void CpAsyncCommit() {
  ThreadAsync& a = g_grid->async[size_t(CurrentThread())];
  a.groups.push_back(std::move(a.open));
  a.open.clear();
  ++a.commits;
}
// wait_group N: every committed group but the N most recent has landed (copies issued after the
// last commit belong to no group and are not waited for).
void CpAsyncWait(int pending_groups) {
  ThreadAsync& a = g_grid->async[size_t(CurrentThread())];
  while (a.groups.size() > size_t(pending_groups)) {
    for (const Pending& p : a.groups.front()) Land(p);
    a.groups.pop_front();
  }
}

namespace {

float HalfLo(uint32_t r, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(r & 0xffffu);
  return bf16 ? BitsTo<float>(uint32_t{h} << 16) : __half2float(__ushort_as_half(h));
}
float HalfHi(uint32_t r, bool bf16) { return HalfLo(r >> 16, bf16); }

}  // namespace

// m16n8k16, A row-major 16x16, B 16x8 ("col"), C/D 16x8 fp32 (PTX ISA, mma.m16n8k16 fragments):
// lane = 4 * g + t; a0/a1: A[g][2t..2t+1], a2/a3 A[g+8][..], a4/a5 A[g][2t+8..], a6/a7 A[g+8][2t+8..];
// b0/b1: B[2t..2t+1][g], b2/b3 B[2t+8..][g]; c0/c1: C[g][2t..2t+1], c2/c3: C[g+8][2t..2t+1].
// Each lane reads only the elements of its own outputs from the exchanged registers.
void MmaM16N8K16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1,
                 bool bf16) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  uint32_t all[6 * 32];  // all[reg * 32 + lane]
  kvq::cuda::warp::CurrentBlock()->ExchangeN(mine, 6, all);
  if (kvq::cuda::warp::CurrentBlock()->lane() == 0) ++g_float_mmas;
  auto half = [&](int reg, int lane, int k) {
    const uint32_t r = all[reg * 32 + lane];
    return (k & 1) ? HalfHi(r, bf16) : HalfLo(r, bf16);
  };
  auto A = [&](int row, int k) { return half((row >> 3) + 2 * (k >> 3), 4 * (row & 7) + ((k & 7) >> 1), k); };
  auto B = [&](int k, int col) { return half(4 + (k >> 3), 4 * col + ((k & 7) >> 1), k); };
  const int lane = kvq::cuda::warp::CurrentBlock()->lane();
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);  // products exact in fp32
    c[i] = acc;
  }
}

// m16n8k32, A u8 16x32 row-major, B s8 32x8, C/D s32 16x8: a0: A[g][4t..4t+3], a1: A[g+8][4t..],
// a2: A[g][16+4t..], a3: A[g+8][16+4t..]; b0: B[4t..4t+3][g], b1: B[16+4t..][g]; C as above.
void ImmaM16N8K32(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  uint32_t all[6 * 32];  // all[reg * 32 + lane]
  kvq::cuda::warp::CurrentBlock()->ExchangeN(mine, 6, all);
  auto byte = [&](int reg, int lane, int k) { return (all[reg * 32 + lane] >> (8 * (k & 3))) & 0xffu; };
  auto A = [&](int row, int k) { return int(byte((row >> 3) + 2 * (k >> 4), 4 * (row & 7) + ((k & 15) >> 2), k)); };
  auto B = [&](int k, int col) { return int(int8_t(byte(4 + (k >> 4), 4 * col + ((k & 15) >> 2), k))); };
  const int lane = kvq::cuda::warp::CurrentBlock()->lane();
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    int acc = c[i];
    for (int k = 0; k < 32; ++k) acc += A(row, k) * B(k, col);
    c[i] = acc;
  }
}

// ldmatrix .m8n8.x4 .b16: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives
// M_j[l / 4][2 (l % 4) .. +1] (with .trans: M_j[2 (l % 4)][l / 4] and M_j[2 (l % 4) + 1][l / 4]).
// Every lane checks its own row address; a bad one goes out as kBadRow, whose row reads as zeros.
void LdMatrixX4(uint32_t (&r)[4], const void* row_address, bool trans) {
  constexpr uint64_t kBadRow = 1;  // never a good row address: not aligned
  const uint64_t p = LdMatrixRowOk(Addr(row_address)) ? Addr(row_address) : kBadRow;
  const uint32_t mine[2] = {static_cast<uint32_t>(p), static_cast<uint32_t>(p >> 32)};
  uint32_t all[2 * 32];
  kvq::cuda::warp::CurrentBlock()->ExchangeN(mine, 2, all);
  auto half = [&](int lane, int byte) {
    const uint64_t a = all[lane] | (uint64_t{all[32 + lane]} << 32);
    uint16_t h = 0;
    if (a != kBadRow) std::memcpy(&h, reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(a)) + byte, 2);
    return uint32_t{h};
  };
  const int lane = kvq::cuda::warp::CurrentBlock()->lane();
  for (int j = 0; j < 4; ++j) {
    if (!trans)
      r[j] = half(8 * j + lane / 4, 4 * (lane % 4)) | (half(8 * j + lane / 4, 4 * (lane % 4) + 2) << 16);
    else
      r[j] = half(8 * j + 2 * (lane % 4), 2 * (lane / 4)) | (half(8 * j + 2 * (lane % 4) + 1, 2 * (lane / 4)) << 16);
  }
}

// movmatrix .m8n8 .trans .b16: lane l holds M[l / 4][2 (l % 4) .. +1] and receives
// M[2 (l % 4)][l / 4] (low half) and M[2 (l % 4) + 1][l / 4] (high half).
uint32_t MovMatrixTrans(uint32_t x) {
  uint32_t all[32];
  kvq::cuda::warp::CurrentBlock()->Exchange(x, all);
  const int lane = kvq::cuda::warp::CurrentBlock()->lane();
  const int g = lane >> 2, t = lane & 3;
  auto elem = [&](int row, int col) { return (all[4 * row + col / 2] >> (16 * (col & 1))) & 0xffffu; };
  return elem(2 * t, g) | (elem(2 * t + 1, g) << 16);
}

}  // namespace kvq_emu

// ---------------------------------------------------------------------------------------------
// Runtime API
using kvq_emu::Fail;

namespace {

int NumSms() {
  const char* e = std::getenv("KVQ_EMU_SMS");
  const int n = e ? std::atoi(e) : 4;
  return n > 0 ? n : 4;
}

void* AlignedAlloc(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, 256, std::max<size_t>(n, 1)) != 0) return nullptr;
  return p;
}

struct EmuStream {};
struct EmuEvent {
  std::chrono::steady_clock::time_point at;  // host time of the last record (work is synchronous)
};

}  // namespace

cudaError_t cudaMalloc(void** p, size_t n) {
  using kvq_emu::kGuard;
  if (!p) return Fail(cudaErrorInvalidValue);
  uint8_t* base = static_cast<uint8_t*>(AlignedAlloc(n + 2 * kGuard));
  if (!base) return Fail(cudaErrorMemoryAllocation);
  std::memset(base, kvq_emu::kGuardByte, kGuard);
  std::memset(base + kGuard, 0xFF, n);
  std::memset(base + kGuard + n, kvq_emu::kGuardByte, kGuard);
  *p = base + kGuard;
  std::lock_guard<std::mutex> lock(kvq_emu::g_mem_mu);
  kvq_emu::g_device_allocs[*p] = n;
  ++kvq_emu::g_mem_epoch;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lock(kvq_emu::g_mem_mu);
  if (kvq_emu::g_device_allocs.erase(p) == 0) return Fail(cudaErrorInvalidValue);
  ++kvq_emu::g_mem_epoch;
  std::free(static_cast<uint8_t*>(p) - kvq_emu::kGuard);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t n) {
  if (!p) return Fail(cudaErrorInvalidValue);
  *p = AlignedAlloc(n);
  if (!*p) return Fail(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(kvq_emu::g_mem_mu);
  kvq_emu::g_host_allocs.insert(*p);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) { return cudaMallocHost(p, n); }
cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lock(kvq_emu::g_mem_mu);
  if (kvq_emu::g_host_allocs.erase(p) == 0) return Fail(cudaErrorInvalidValue);
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (n > 0 && (!dst || !src)) return Fail(cudaErrorInvalidValue);
  if (n > 0) std::memmove(dst, src, n);
  ++kvq_emu::g_mem_epoch;
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, n, kind);
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  if (n > 0 && !p) return Fail(cudaErrorInvalidValue);
  if (n > 0) std::memset(p, v, n);
  ++kvq_emu::g_mem_epoch;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { return cudaMemset(p, v, n); }
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = kvq_emu::t_last_error;
  kvq_emu::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return kvq_emu::t_last_error; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulated: a guard band was overwritten, a cp.async sector split, or an mbarrier misuse)";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    default: return "emulated CUDA error";
  }
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    default: return "cudaErrorUnknown";
  }
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : Fail(cudaErrorInvalidDevice); }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = NumSms(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = kvq_emu::kMaxSmemOptin; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *v = kvq_emu::kMaxThreads; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
    default: return Fail(cudaErrorInvalidValue);
  }
}
// Static shared memory is not known on the host (0); registers neither.
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* func) {
  if (!a || !func) return Fail(cudaErrorInvalidDeviceFunction);
  std::memset(a, 0, sizeof(*a));
  a->maxThreadsPerBlock = kvq_emu::kMaxThreads;
  a->maxDynamicSharedSizeBytes = kvq_emu::kMaxSmemOptin;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (!func) return Fail(cudaErrorInvalidDeviceFunction);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize && (value < 0 || value > kvq_emu::kMaxSmemOptin))
    return Fail(cudaErrorInvalidValue);
  return cudaSuccess;
}
// Up to 4 blocks per SM, fewer when the dynamic shared memory (plus 32 KB taken for the static
// part) does not fit 228 KB four times.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, const void* func, int block, size_t smem,
                                                                  unsigned) {
  if (!n || !func || block <= 0 || block > kvq_emu::kMaxThreads) return Fail(cudaErrorInvalidValue);
  const size_t per_block = smem + 32 * 1024;
  *n = static_cast<int>(std::min<size_t>(4, (228 * 1024) / per_block));
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new EmuStream);
  ++kvq_emu::g_live_streams;
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (s) --kvq_emu::g_live_streams;
  delete reinterpret_cast<EmuStream*>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = reinterpret_cast<cudaEvent_t>(new EmuEvent);
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<EmuEvent*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  reinterpret_cast<EmuEvent*>(e)->at = std::chrono::steady_clock::now();
  return cudaSuccess;
}
// Host time between the records: the emulator's, not a GPU's.
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(reinterpret_cast<EmuEvent*>(b)->at - reinterpret_cast<EmuEvent*>(a)->at)
            .count();
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "kvq emulated device (CPU)");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = NumSms();
  prop->l2CacheSize = 4 << 20;
  prop->sharedMemPerBlockOptin = kvq_emu::kMaxSmemOptin;
  prop->maxThreadsPerBlock = kvq_emu::kMaxThreads;
  prop->warpSize = 32;
  prop->totalGlobalMem = size_t{8} << 30;
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
