// The store on the CUDA backend against the store on the CPU backend: the same sessions (several
// presets in one Attend batch), the same prefill, decode steps and a retry inside the window; the
// outputs must agree within the kernels' error bound at every step. Also: out-of-memory at
// start-up is RESOURCE_EXHAUSTED, and --backend=auto picks CUDA when a device is present.
// Skipped visibly without a device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvstore/backend.h"
#include "kvstore/cpu_backend.h"
#include "kvstore/cuda_backend.h"
#include "kvstore/store.h"
#include "kvstore/tenants.h"
#include "scenario.h"

namespace kvq::store {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!kvq::testing::HaveCudaDevice()) GTEST_SKIP() << "no CUDA device: CUDA backend test not run"

std::string RandomBytes(int64_t n, DType dt, std::mt19937& rng, float scale) {
  const std::vector<uint16_t> v = kvq::testing::RandomActs(n, dt, rng, scale);
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 2);
}

double NormErr(const std::string& a, const std::string& b, DType dt) {
  const auto* x = reinterpret_cast<const uint16_t*>(a.data());
  const auto* y = reinterpret_cast<const uint16_t*>(b.data());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() / 2; ++i) {
    const float fx = kvq::testing::FromAct(x[i], dt), fy = kvq::testing::FromAct(y[i], dt);
    if (std::isnan(fx) || std::isnan(fy)) return INFINITY;
    num += double(fx - fy) * (fx - fy);
    den += double(fy) * fy;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

TEST(StoreCudaBackend, MatchesCpuBackend) {
  SKIP_WITHOUT_GPU();
  const int64_t pool = int64_t{256} << 20;
  auto cpu = CpuBackend::Create(pool, 0);
  auto gpu = CudaBackend::Create(pool);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  Store scpu(StoreOptions{}, std::move(cpu).value());
  Store sgpu(StoreOptions{}, std::move(gpu).value());
  EXPECT_EQ(sgpu.backend().name(), "cuda");
  Tenant tc{"a", TenantQuota{}}, tg{"a", TenantQuota{}};
  const int hq = 8, hkv = 2, d = 128, layers = 2;
  const DType dt = DType::kF16;
  const Preset presets[] = {Preset::kFp16, Preset::kKivi2, Preset::kInnerQ, Preset::kInnerQ2};
  std::vector<std::string> ids_c, ids_g;
  for (Preset p : presets) {
    SessionSpec spec;
    spec.num_layers = layers;
    spec.num_q_heads = hq;
    spec.cache.num_kv_heads = hkv;
    spec.cache.head_dim = d;
    spec.cache.dtype = dt;
    spec.cache.config = PresetConfig(p);
    spec.has_preset = true;
    spec.preset = p;
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

}  // namespace
}  // namespace kvq::store
