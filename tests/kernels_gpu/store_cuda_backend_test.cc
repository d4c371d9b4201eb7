// The store on the CUDA backend against the store on the CPU backend: the same sessions (several
// presets in one Attend batch), the same prefill, decode steps and a retry inside the window; the
// outputs must agree within the kernels' error bound at every step; again with the CUDA store's
// flushes after the attention (StoreOptions::flush_after). Also: out-of-memory at
// start-up is RESOURCE_EXHAUSTED, and --backend=auto picks CUDA when a device is present.
// Lanes: four client threads drive their own sessions concurrently on one store (several lanes)
// and must match the same sessions run serially on the CPU backend, with steps really overlapping;
// a failed step gives its lane back. Skipped visibly without a device (the lane-count checks need
// none).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvstore/backend.h"
#include "kvstore/cpu_backend.h"
#include "kvstore/cuda_backend.h"
#include "kvstore/store.h"
#include "kvstore/tenants.h"
#include "scenario.h"
#include "tests/kvstore/test_util.h"

namespace kvq::store {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!kvq::testing::HaveCudaDevice()) GTEST_SKIP() << "no CUDA device: CUDA backend test not run"

std::string RandomBytes(int64_t n, DType dt, std::mt19937& rng, float scale) {
  const std::vector<uint16_t> v = kvq::testing::RandomActs(n, dt, rng, scale);
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 2);
}

using testing::NormErr;  // tests/kvstore/test_util.h

SessionSpec PresetSpec(Preset p, int layers, int hq, int hkv, int d, DType dt) {
  SessionSpec spec;
  spec.num_layers = layers;
  spec.num_q_heads = hq;
  spec.cache.num_kv_heads = hkv;
  spec.cache.head_dim = d;
  spec.cache.dtype = dt;
  spec.cache.config = PresetConfig(p);
  spec.has_preset = true;
  spec.preset = p;
  return spec;
}

// flush_after: the CUDA store runs each step's next flush beside its attention (StoreOptions).
void RunMatchesCpuBackend(bool flush_after) {
  const int64_t pool = int64_t{256} << 20;
  auto cpu = CpuBackend::Create(pool, 0);
  auto gpu = CudaBackend::Create(pool);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  Store scpu(StoreOptions{}, std::move(cpu).value());
  StoreOptions gpu_options;
  gpu_options.flush_after = flush_after;
  Store sgpu(gpu_options, std::move(gpu).value());
  EXPECT_EQ(sgpu.backend().name(), "cuda");
  Tenant tc{"a", TenantQuota{}}, tg{"a", TenantQuota{}};
  const int hq = 8, hkv = 2, d = 128, layers = 2;
  const DType dt = DType::kF16;
  const Preset presets[] = {Preset::kFp16, Preset::kKivi2, Preset::kInnerQ, Preset::kInnerQ2};
  std::vector<std::string> ids_c, ids_g;
  for (Preset p : presets) {
    const SessionSpec spec = PresetSpec(p, layers, hq, hkv, d, dt);
    auto a = scpu.CreateSession(tc, spec);
    auto b = sgpu.CreateSession(tg, spec);
    ASSERT_TRUE(a.ok() && b.ok());
    ids_c.push_back(*a);
    ids_g.push_back(*b);
  }
  std::mt19937 rng(2024);
  std::vector<int> pos(ids_c.size(), 0);
  // Steps: prefill 300 tokens, then 1-token decode steps, one 3-token chunk, and a retry of the
  // last decode step (same position again) near the end.
  std::vector<int> plan = {300};
  for (int i = 0; i < 150; ++i) plan.push_back(i == 70 ? 3 : 1);
  for (size_t step = 0; step < plan.size() + 1; ++step) {
    const bool retry = step == plan.size();
    const int n = retry ? 1 : plan[step];
    for (int layer = 0; layer < layers; ++layer) {
      std::vector<std::string> q, k, v;
      std::vector<AttendInput> in_c, in_g;
      for (size_t s = 0; s < ids_c.size(); ++s) {
        q.push_back(RandomBytes(int64_t{n} * hq * d, dt, rng, 1.f));
        k.push_back(RandomBytes(int64_t{n} * hkv * d, dt, rng, 2.f));
        v.push_back(RandomBytes(int64_t{n} * hkv * d, dt, rng, 1.f));
      }
      for (size_t s = 0; s < ids_c.size(); ++s) {
        const int p = retry ? pos[s] - 1 : pos[s];
        in_c.push_back(AttendInput{ids_c[s], p, n, q[s], k[s], v[s]});
        in_g.push_back(AttendInput{ids_g[s], p, n, q[s], k[s], v[s]});
      }
      std::vector<std::string> oc(ids_c.size()), og(ids_c.size());
      std::vector<AttendOutput> out_c(ids_c.size()), out_g(ids_c.size());
      for (size_t s = 0; s < ids_c.size(); ++s) {
        out_c[s].o = &oc[s];
        out_g[s].o = &og[s];
      }
      scpu.Attend(tc, layer, dt, in_c, &out_c);
      sgpu.Attend(tg, layer, dt, in_g, &out_g);
      for (size_t s = 0; s < ids_c.size(); ++s) {
        ASSERT_TRUE(out_c[s].status.ok()) << out_c[s].status;
        ASSERT_TRUE(out_g[s].status.ok()) << "step " << step << " seq " << s << ": " << out_g[s].status;
        ASSERT_EQ(out_c[s].length, out_g[s].length);
        ASSERT_EQ(oc[s].size(), og[s].size());
        EXPECT_LT(NormErr(og[s], oc[s], dt), 2e-3) << "step " << step << " layer " << layer << " "
                                                   << PresetName(presets[s]);
      }
    }
    if (!retry)
      for (auto& p : pos) p += n;
  }
}

TEST(StoreCudaBackend, MatchesCpuBackend) {
  SKIP_WITHOUT_GPU();
  RunMatchesCpuBackend(false);
}

TEST(StoreCudaBackend, MatchesCpuBackendWithFlushAfter) {
  SKIP_WITHOUT_GPU();
  RunMatchesCpuBackend(true);
}

TEST(StoreCudaBackend, OutOfMemoryIsResourceExhausted) {
  SKIP_WITHOUT_GPU();
  auto b = CudaBackend::Create(int64_t{1} << 50);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted) << b.status();
  // The device is still usable afterwards.
  auto ok = CudaBackend::Create(int64_t{16} << 20);
  EXPECT_TRUE(ok.ok()) << ok.status();
}

TEST(StoreCudaBackend, AutoPicksCuda) {
  SKIP_WITHOUT_GPU();
  auto b = MakeBackend(BackendKind::kAuto, int64_t{16} << 20, 0);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->name(), "cuda");
}

TEST(StoreCudaBackend, LaneCountIsChecked) {
  // Checked before the device is looked at: runs without a GPU too.
  for (int lanes : {0, -1, CudaBackend::kMaxLanes + 1}) {
    auto b = CudaBackend::Create(int64_t{16} << 20, lanes);
    ASSERT_FALSE(b.ok()) << lanes;
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument) << b.status();
    BackendOptions o;
    o.cuda_lanes = lanes;
    for (BackendKind kind : {BackendKind::kAuto, BackendKind::kCuda}) {
      auto m = MakeBackend(kind, int64_t{16} << 20, o);
      ASSERT_FALSE(m.ok()) << lanes;
      EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
    }
  }
}

// One client's work: its sessions (one preset), the inputs of every step and layer, and the CPU
// reference outputs of the same steps.
struct Client {
  Preset preset;
  std::vector<std::string> ids_c, ids_g;
  std::vector<int> plan;  // tokens per step
  // [step][layer][session]
  std::vector<std::vector<std::vector<std::string>>> q, k, v, o_cpu;
};

// Runs step `step`, layer `layer` of `c` on `store` (sessions `ids`) into `o`.
absl::Status ClientStep(Store& store, Tenant& t, const std::vector<std::string>& ids, const Client& c, int pos,
                        size_t step, int layer, DType dt, std::vector<std::string>* o) {
  const int n = c.plan[step];
  std::vector<AttendInput> in;
  std::vector<AttendOutput> out(ids.size());
  o->assign(ids.size(), std::string());
  for (size_t s = 0; s < ids.size(); ++s) {
    in.push_back(AttendInput{ids[s], pos, n, c.q[step][layer][s], c.k[step][layer][s], c.v[step][layer][s]});
    out[s].o = &(*o)[s];
  }
  store.Attend(t, layer, dt, in, &out);
  for (size_t s = 0; s < ids.size(); ++s)
    if (!out[s].status.ok()) return out[s].status;
  return absl::OkStatus();
}

TEST(StoreCudaBackend, ConcurrentLanesMatchCpuBackend) {
  SKIP_WITHOUT_GPU();
  const int64_t pool = int64_t{256} << 20;
  const int lanes = 3;
  auto cpu = CpuBackend::Create(pool, 0);
  auto gpu = CudaBackend::Create(pool, lanes);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  CudaBackend* cuda = gpu->get();
  EXPECT_EQ(cuda->num_lanes(), lanes);
  Store scpu(StoreOptions{}, std::move(cpu).value());
  Store sgpu(StoreOptions{}, std::move(gpu).value());
  Tenant tc{"a", TenantQuota{}}, tg{"a", TenantQuota{}};
  const int hq = 8, hkv = 2, d = 128, layers = 2, per_client = 2;
  const DType dt = DType::kF16;
  const Preset presets[] = {Preset::kFp16, Preset::kKivi2, Preset::kInnerQ, Preset::kInnerQ2};
  std::vector<Client> clients;
  for (int ci = 0; ci < 4; ++ci) {
    Client c;
    c.preset = presets[ci];
    for (int s = 0; s < per_client; ++s) {
      const SessionSpec spec = PresetSpec(c.preset, layers, hq, hkv, d, dt);
      auto a = scpu.CreateSession(tc, spec);
      auto b = sgpu.CreateSession(tg, spec);
      ASSERT_TRUE(a.ok() && b.ok());
      c.ids_c.push_back(*a);
      c.ids_g.push_back(*b);
    }
    // Prefill lengths differ per client so that prefill and decode steps of different clients
    // meet; one 3-token chunk in the middle.
    c.plan = {160 + 48 * ci};
    for (int i = 0; i < 100; ++i) c.plan.push_back(i == 40 + ci ? 3 : 1);
    std::mt19937 rng(7000 + ci);
    for (int n : c.plan) {
      c.q.emplace_back(layers);
      c.k.emplace_back(layers);
      c.v.emplace_back(layers);
      for (int l = 0; l < layers; ++l)
        for (int s = 0; s < per_client; ++s) {
          c.q.back()[l].push_back(RandomBytes(int64_t{n} * hq * d, dt, rng, 1.f));
          c.k.back()[l].push_back(RandomBytes(int64_t{n} * hkv * d, dt, rng, 2.f));
          c.v.back()[l].push_back(RandomBytes(int64_t{n} * hkv * d, dt, rng, 1.f));
        }
    }
    clients.push_back(std::move(c));
  }
  // The reference: every client serially on the CPU backend.
  for (Client& c : clients) {
    int pos = 0;
    for (size_t step = 0; step < c.plan.size(); ++step) {
      c.o_cpu.emplace_back(layers);
      for (int l = 0; l < layers; ++l) {
        const absl::Status st = ClientStep(scpu, tc, c.ids_c, c, pos, step, l, dt, &c.o_cpu.back()[l]);
        ASSERT_TRUE(st.ok()) << st;
      }
      pos += c.plan[step];
    }
  }
  // The same clients at once on the CUDA backend, one thread each, compared at every step.
  struct Outcome {
    std::string failure;
    double max_err = 0;
  };
  std::vector<Outcome> outcomes(clients.size());
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (size_t ci = 0; ci < clients.size(); ++ci)
    threads.emplace_back([&, ci] {
      const Client& c = clients[ci];
      Outcome& out = outcomes[ci];
      ready.fetch_add(1);
      while (ready.load() < static_cast<int>(clients.size())) std::this_thread::yield();
      int pos = 0;
      std::vector<std::string> og;
      for (size_t step = 0; step < c.plan.size() && out.failure.empty(); ++step) {
        for (int l = 0; l < layers && out.failure.empty(); ++l) {
          const std::string where = std::string(PresetName(c.preset)) + " step " + std::to_string(step) +
                                    " layer " + std::to_string(l);
          const absl::Status st = ClientStep(sgpu, tg, c.ids_g, c, pos, step, l, dt, &og);
          if (!st.ok()) {
            out.failure = where + ": " + st.ToString();
            break;
          }
          for (int s = 0; s < per_client; ++s) {
            const std::string& ref = c.o_cpu[step][l][s];
            const double err = og[s].size() == ref.size() ? NormErr(og[s], ref, dt) : INFINITY;
            out.max_err = std::max(out.max_err, err);
            if (!(err < 2e-3)) out.failure = where + " session " + std::to_string(s) + ": error " + std::to_string(err);
          }
        }
        pos += c.plan[step];
      }
    });
  for (auto& t : threads) t.join();
  for (size_t ci = 0; ci < clients.size(); ++ci) {
    EXPECT_TRUE(outcomes[ci].failure.empty()) << outcomes[ci].failure;
    std::printf("  %s: max normalized error %.2e\n", PresetName(clients[ci].preset), outcomes[ci].max_err);
  }
  std::printf("  lanes %d, most busy at once %d\n", cuda->num_lanes(), cuda->max_busy_lanes());
  EXPECT_GE(cuda->max_busy_lanes(), 2) << "the steps never ran concurrently";
  EXPECT_LE(cuda->max_busy_lanes(), lanes);
  EXPECT_EQ(cuda->busy_lanes(), 0);
}

TEST(StoreCudaBackend, FailedStepGivesItsLaneBack) {
  SKIP_WITHOUT_GPU();
  auto gpu = CudaBackend::Create(int64_t{64} << 20, 1);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  CudaBackend* cuda = gpu->get();
  // A step whose rows need terabytes of staging fails after it took the lane (growing the
  // runner's output region runs out of memory). With one lane, a lane that was not given back
  // would hang the second call.
  const int hq = 8, hkv = 2, d = 128;
  std::vector<uint16_t> buf(size_t(hq) * d, 0);
  kvq::StepParams p;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.q = p.k_new = p.v_new = buf.data();
  p.o = buf.data();
  kvq::SeqWork w;
  w.n_new = 1;
  w.q_row = w.kv_row = int64_t{1} << 30;
  const kvq::QuantConfig config = PresetConfig(Preset::kKivi2);
  for (int i = 0; i < 2; ++i) {
    const absl::Status st = cuda->RunStep(p, &w, &config, 1);
    EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
    EXPECT_EQ(cuda->busy_lanes(), 0);
  }
  // The lane still serves real steps.
  Store store(StoreOptions{}, std::move(gpu).value());
  Tenant t{"a", TenantQuota{}};
  auto id = store.CreateSession(t, PresetSpec(Preset::kKivi2, 1, hq, hkv, d, DType::kF16));
  ASSERT_TRUE(id.ok()) << id.status();
  std::mt19937 rng(5);
  for (int pos = 0; pos < 40; pos += 20) {
    const std::string q = RandomBytes(int64_t{20} * hq * d, DType::kF16, rng, 1.f);
    const std::string k = RandomBytes(int64_t{20} * hkv * d, DType::kF16, rng, 1.f);
    std::string o;
    std::vector<AttendOutput> out(1);
    out[0].o = &o;
    store.Attend(t, 0, DType::kF16, {AttendInput{*id, pos, 20, q, k, k}}, &out);
    ASSERT_TRUE(out[0].status.ok()) << out[0].status;
    EXPECT_EQ(o.size(), q.size());
    EXPECT_EQ(NormErr(o, o, DType::kF16), 0.0);  // no NaN (NormErr is infinite on one)
  }
}

}  // namespace
}  // namespace kvq::store
