// Unit tests of the store core (no gRPC): page pool, tenants, sessions, batched Attend against an
// independent reference, validation, quotas and the half-finished-step retry.
#include <algorithm>
#include <atomic>
#include <random>
#include <thread>

#include "gtest/gtest.h"
#include "kvstore/cpu_backend.h"
#include "kvstore/page_pool.h"
#include "kvstore/store.h"
#include "kvstore/tenants.h"
#include "test_util.h"

namespace kvq::store {
namespace {

using testing::RandomStep;
using testing::ReferenceSession;
using testing::StepInput;
using testing::TestShape;

// ---------------------------------------------------------------- page pool

TEST(PagePool, ReusesFreedPagesAndReclaimsTheTop) {
  PagePool pool(1000 * 16);
  int64_t a, b, c, d;
  ASSERT_TRUE(pool.Allocate(100, &a));  // rounded to 112
  ASSERT_TRUE(pool.Allocate(160, &b));
  ASSERT_TRUE(pool.Allocate(100, &c));
  EXPECT_EQ(a % 16, 0);
  EXPECT_EQ(b, 112);
  EXPECT_EQ(pool.used(), 112 + 160 + 112);
  pool.Free(a, 100);
  ASSERT_TRUE(pool.Allocate(100, &d));
  EXPECT_EQ(d, a);  // same-size free list
  pool.Free(d, 100);
  pool.Free(b, 160);
  pool.Free(c, 100);  // the top page: back to the bump region, then a, b are below the top
  EXPECT_EQ(pool.used(), 0);
  // A page bigger than anything freed still fits: free pages at the top are reclaimed.
  int64_t big;
  ASSERT_TRUE(pool.Allocate(1000 * 16, &big));
  EXPECT_EQ(big, 0);
  EXPECT_FALSE(pool.Allocate(16, &d));
  pool.Free(big, 1000 * 16);
  EXPECT_EQ(pool.bad_frees(), 0);
}

TEST(PagePool, RejectsBadRequestsWithoutCrashing) {
  PagePool pool(4096);
  int64_t off;
  EXPECT_FALSE(pool.Allocate(0, &off));
  EXPECT_FALSE(pool.Allocate(-5, &off));
  EXPECT_FALSE(pool.Allocate(8192, &off));
  pool.Free(-16, 16);
  pool.Free(4096, 16);
  pool.Free(8, 16);     // misaligned
  pool.Free(1024, 16);  // never handed out (above the bump pointer)
  EXPECT_EQ(pool.bad_frees(), 4);
  EXPECT_EQ(pool.used(), 0);
}

// ---------------------------------------------------------------- tenants

TEST(Tenants, ParsesTheFileFormat) {
  auto reg = TenantRegistry::Parse(
      "# token tenant max_sessions max_tokens max_bytes\n"
      "\n"
      "alpha-token-1 alpha 2 1000 0   # comment\n"
      "alpha-token-2 alpha 2 1000 0\n"
      "beta-token-01\tbeta 0 0 65536\n");
  ASSERT_TRUE(reg.ok()) << reg.status();
  EXPECT_TRUE(reg->auth_required());
  ASSERT_EQ(reg->tenants().size(), 2u);
  const std::string h1 = "Bearer alpha-token-1", h2 = "Bearer alpha-token-2", h3 = "Bearer beta-token-01";
  auto t1 = reg->Authenticate(&h1), t2 = reg->Authenticate(&h2), t3 = reg->Authenticate(&h3);
  ASSERT_TRUE(t1.ok() && t2.ok() && t3.ok());
  EXPECT_EQ(*t1, *t2);
  EXPECT_EQ((*t1)->name(), "alpha");
  EXPECT_EQ((*t1)->quota().max_sessions, 2);
  EXPECT_EQ((*t1)->quota().max_tokens, 1000);
  EXPECT_EQ((*t3)->name(), "beta");
  EXPECT_EQ((*t3)->quota().max_bytes, 65536);
}

TEST(Tenants, BadFilesNameTheLine) {
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {"tok-12345 a 1 2\n", "line 1"},
      {"\ntok-12345 a 1 2 x\n", "line 2: max_bytes"},
      {"tok-12345 a -1 2 3\n", "max_sessions"},
      {"short a 1 2 3\n", "8..512"},
      {"tok-12345 a 1 2 3\ntok-12345 b 1 2 3\n", "duplicate token"},
      {"tok-12345 a 1 2 3\ntok-67890 a 1 2 4\n", "different quotas"},
      {"# nothing\n", "names no tenant"},
  };
  for (const Case& c : cases) {
    auto reg = TenantRegistry::Parse(c.text);
    ASSERT_FALSE(reg.ok()) << c.text;
    EXPECT_EQ(reg.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(reg.status().message().find(c.want), std::string::npos) << reg.status();
  }
}

TEST(Tenants, AuthenticationFailures) {
  auto reg = TenantRegistry::Parse("good-token-1 a 0 0 0\n");
  ASSERT_TRUE(reg.ok());
  const std::string wrong = "Bearer bad-token-1", scheme = "Basic good-token-1", ok = "Bearer good-token-1";
  EXPECT_EQ(reg->Authenticate(nullptr).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(reg->Authenticate(&wrong).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(reg->Authenticate(&scheme).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(reg->Authenticate(&ok).ok());
  TenantRegistry open;  // no tenants file: one default tenant, no token needed
  EXPECT_FALSE(open.auth_required());
  auto t = open.Authenticate(nullptr);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->name(), "default");
}

TEST(Tenants, QuotaCountersAreAtomic) {
  Tenant t("t", TenantQuota{0, 1000, 0});
  std::vector<std::thread> threads;
  std::atomic<int> granted{0};
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&] {
      for (int j = 0; j < 1000; ++j)
        if (t.TryAddTokens(1)) granted++;
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(granted.load(), 1000);
  EXPECT_EQ(t.tokens(), 1000);
}

// ---------------------------------------------------------------- store

SessionSpec SpecOf(const TestShape& s) {
  SessionSpec spec;
  spec.num_layers = s.layers;
  spec.num_q_heads = s.hq;
  spec.cache.num_kv_heads = s.hkv;
  spec.cache.head_dim = s.d;
  spec.cache.dtype = s.dtype;
  spec.cache.config = s.config;
  return spec;
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override { MakeStore(int64_t{64} << 20); }

  void MakeStore(int64_t pool_bytes, StoreOptions opts = {}) {
    store_.reset();
    auto backend = CpuBackend::Create(pool_bytes, 1);
    ASSERT_TRUE(backend.ok());
    backend_ = backend->get();
    store_ = std::make_unique<Store>(opts, std::move(backend).value());
  }

  std::string Create(Tenant& t, const TestShape& s) {
    auto id = store_->CreateSession(t, SpecOf(s));
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : "";
  }

  // One entry, one layer; returns the entry's status and fills `o`.
  absl::Status AttendOne(Tenant& t, const std::string& id, int layer, int pos, int n, const StepInput& in,
                         std::string* o = nullptr, kvq::DType dtype = kvq::DType::kF16) {
    std::string sink;
    std::vector<AttendInput> ins{AttendInput{id, pos, n, in.q, in.k, in.v}};
    std::vector<AttendOutput> outs(1);
    outs[0].o = o != nullptr ? o : &sink;
    store_->Attend(t, layer, dtype, ins, &outs);
    return outs[0].status;
  }

  Tenant tenant_{"a", TenantQuota{}};
  Tenant other_{"b", TenantQuota{}};
  CpuBackend* backend_ = nullptr;
  std::unique_ptr<Store> store_;
};

// The store with each step's next flush right after its attention (StoreOptions::flush_after) and
// without: the same outputs, bit for bit, through prefill chunks, decode steps, half-finished steps
// and their retries.
class StoreFlushTest : public StoreTest, public ::testing::WithParamInterface<bool> {
 protected:
  void SetUp() override {
    StoreOptions o;
    o.flush_after = GetParam();
    MakeStore(int64_t{64} << 20, o);
  }
};
INSTANTIATE_TEST_SUITE_P(FlushAfter, StoreFlushTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "on" : "off"; });

TEST_F(StoreTest, SpecValidation) {
  TestShape s;
  SessionSpec spec = SpecOf(s);
  spec.num_layers = 0;
  EXPECT_NE(Store::ValidateSpec(spec).find("num_layers"), std::string::npos);
  spec = SpecOf(s);
  spec.num_q_heads = 3;  // not a multiple of Hkv = 2
  EXPECT_NE(Store::ValidateSpec(spec).find("num_q_heads"), std::string::npos);
  spec = SpecOf(s);
  spec.cache.head_dim = 80;
  EXPECT_NE(Store::ValidateSpec(spec).find("head_dim"), std::string::npos);
  spec = SpecOf(s);
  spec.softmax_scale = std::nanf("");
  EXPECT_NE(Store::ValidateSpec(spec).find("softmax_scale"), std::string::npos);
  spec = SpecOf(s);
  auto id = store_->CreateSession(tenant_, SpecOf(s));
  ASSERT_TRUE(id.ok());
  spec.num_layers = 5000;
  EXPECT_EQ(store_->CreateSession(tenant_, spec).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(StoreTest, SessionLifecycleAndTenantIsolation) {
  TestShape s;
  const std::string a = Create(tenant_, s), b = Create(tenant_, s), c = Create(other_, s);
  EXPECT_EQ(a.size(), 32u);
  EXPECT_NE(a, b);
  EXPECT_EQ(a.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ(store_->ListSessions(tenant_).size(), 2u);
  EXPECT_EQ(store_->ListSessions(other_).size(), 1u);
  // Another tenant's session is exactly as invisible as an unknown one.
  auto foreign = store_->GetSession(tenant_, c);
  auto unknown = store_->GetSession(tenant_, std::string(32, 'f'));
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(foreign.status(), unknown.status());
  EXPECT_EQ(store_->DropSession(tenant_, c).code(), absl::StatusCode::kNotFound);
  std::mt19937_64 rng(7);
  EXPECT_EQ(AttendOne(tenant_, c, 0, 0, 1, RandomStep(s, 1, rng)).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetSession(other_, c)->layer_lengths, std::vector<int32_t>({0, 0}));
  ASSERT_TRUE(store_->DropSession(tenant_, a).ok());
  EXPECT_EQ(store_->GetSession(tenant_, a).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->DropSession(tenant_, a).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Stats().sessions, 2);
}

// Several sessions with different presets, two layers, chunked prefill then decode, all entries of a
// layer in one request: every output equals the independent reference bit for bit.
TEST_P(StoreFlushTest, BatchedStepsMatchTheReference) {
  const kvq::Preset presets[] = {kvq::Preset::kKivi2, kvq::Preset::kInnerQ, kvq::Preset::kFp16, kvq::Preset::kKivi4};
  std::vector<TestShape> shapes;
  std::vector<std::string> ids;
  std::vector<std::unique_ptr<ReferenceSession>> refs;
  for (kvq::Preset p : presets) {
    TestShape s;
    s.config = kvq::PresetConfig(p);
    shapes.push_back(s);
    ids.push_back(Create(tenant_, s));
    refs.push_back(std::make_unique<ReferenceSession>(s));
  }
  std::mt19937_64 rng(1234);
  // Prefill chunks of different sizes per session, then decode: 230 tokens cross every preset's
  // flush point (kivi2 K: 128; innerq V: sink 32 + keep 96 + flush 32).
  std::vector<int> pos(ids.size(), 0);
  const int total = 230;
  int step = 0;
  auto busy = [&] { return std::any_of(pos.begin(), pos.end(), [&](int p) { return p < total; }); };
  while (busy()) {
    std::vector<int> live;  // sessions still short of `total` take part in this step
    for (size_t i = 0; i < ids.size(); ++i)
      if (pos[i] < total) live.push_back(int(i));
    std::vector<StepInput> ins(ids.size());
    std::vector<int> ns(ids.size(), 0);
    for (int i : live) ns[i] = pos[i] < 160 ? std::min<int>(37 + 11 * i, 160 - pos[i]) : 1;
    for (int layer = 0; layer < 2; ++layer) {
      std::vector<AttendInput> req;
      std::vector<AttendOutput> outs(live.size());
      std::vector<std::string> o(live.size());
      for (size_t j = 0; j < live.size(); ++j) {
        const int i = live[j];
        ins[i] = RandomStep(shapes[i], ns[i], rng);
        req.push_back(AttendInput{ids[i], pos[i], ns[i], ins[i].q, ins[i].k, ins[i].v});
        outs[j].o = &o[j];
      }
      AttendSummary sum = store_->Attend(tenant_, layer, kvq::DType::kF16, req, &outs);
      ASSERT_EQ(sum.ok_entries, int(live.size()));
      for (size_t j = 0; j < live.size(); ++j) {
        const int i = live[j];
        ASSERT_TRUE(outs[j].status.ok()) << outs[j].status;
        const std::string want = refs[i]->Step(layer, pos[i], ns[i], ins[i].q, ins[i].k, ins[i].v);
        ASSERT_EQ(o[j].size(), want.size());
        ASSERT_TRUE(o[j] == want) << "preset " << kvq::PresetName(presets[i]) << " layer " << layer << " step "
                                  << step;
        EXPECT_EQ(outs[j].length, pos[i] + ns[i]);
      }
    }
    for (int i : live) pos[i] += ns[i];
    ++step;
  }
  // Bytes by kind and fp16-equivalent bytes agree with the reference's caches.
  int64_t want_total = 0, want_fp16 = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    auto snap = store_->GetSession(tenant_, ids[i]);
    ASSERT_TRUE(snap.ok());
    kvq::CacheBytes want;
    for (int l = 0; l < 2; ++l) {
      const kvq::CacheBytes b = refs[i]->bytes(l);
      want.codes += b.codes;
      want.scales += b.scales;
      want.full_precision += b.full_precision;
      want.metadata += b.metadata;
      EXPECT_EQ(snap->layer_lengths[l], total);
    }
    if (GetParam()) {
      // the body pages of the flush after the last step are held too: at most one more page per
      // stream and layer (each pending flush here is at most 128 tokens, one page)
      const kvq::StreamLayout lk = kvq::MakeStreamLayout(shapes[i].config.k, shapes[i].hkv, shapes[i].d);
      const kvq::StreamLayout lv = kvq::MakeStreamLayout(shapes[i].config.v, shapes[i].hkv, shapes[i].d);
      EXPECT_GE(snap->bytes.codes, want.codes);
      EXPECT_GE(snap->bytes.scales, want.scales);
      const int64_t ahead = (snap->bytes.codes + snap->bytes.scales) - (want.codes + want.scales);
      EXPECT_LE(ahead, int64_t{shapes[i].layers} * (lk.quant_page_bytes + lv.quant_page_bytes));
      if (!shapes[i].config.k.quantized()) {
        EXPECT_EQ(ahead, 0) << "nothing to flush";
      }
    } else {
      EXPECT_EQ(snap->bytes.codes, want.codes);
      EXPECT_EQ(snap->bytes.scales, want.scales);
    }
    EXPECT_EQ(snap->bytes.full_precision, want.full_precision);
    EXPECT_EQ(snap->bytes.metadata, want.metadata);
    EXPECT_EQ(snap->fp16_equivalent_bytes, int64_t{2} * total * 2 * 64 * 2 * 2);
    want_total += GetParam() ? snap->bytes.total() : want.total();
    want_fp16 += snap->fp16_equivalent_bytes;
  }
  const StoreStats st = store_->Stats();
  EXPECT_EQ(st.bytes.total(), want_total);
  EXPECT_EQ(st.fp16_equivalent_bytes, want_fp16);
  EXPECT_EQ(st.tokens, int64_t{total} * int64_t(ids.size()));
  EXPECT_LT(st.bytes.codes + st.bytes.scales, want_total);  // something was quantized
  EXPECT_GE(st.pool_used, want_total);
  for (const std::string& id : ids) ASSERT_TRUE(store_->DropSession(tenant_, id).ok());
  EXPECT_EQ(store_->Stats().pool_used, 0);
  EXPECT_EQ(store_->Stats().bytes.total(), 0);
  EXPECT_EQ(store_->Stats().tokens, 0);
  EXPECT_EQ(tenant_.bytes(), 0);
  EXPECT_EQ(tenant_.tokens(), 0);
  EXPECT_EQ(backend_->pool().bad_frees(), 0);
}

// One request whose sessions have different model shapes and dtypes run as one backend call per
// shape; bf16 sessions match the reference too.
TEST_F(StoreTest, MixedShapesInOneRequestAndBf16) {
  TestShape a, b, c;
  a.dtype = b.dtype = c.dtype = kvq::DType::kBF16;
  a.config = kvq::PresetConfig(kvq::Preset::kInnerQ);
  b.hq = 8;  // GQA 4
  b.config = kvq::PresetConfig(kvq::Preset::kKivi4);
  c.hkv = 1;
  c.hq = 2;
  c.d = 128;
  c.config = kvq::PresetConfig(kvq::Preset::kInnerQBase);
  const std::vector<TestShape> shapes{a, b, c};
  std::vector<std::string> ids;
  std::vector<std::unique_ptr<ReferenceSession>> refs;
  for (const TestShape& s : shapes) {
    ids.push_back(Create(tenant_, s));
    refs.push_back(std::make_unique<ReferenceSession>(s));
  }
  std::mt19937_64 rng(4242);
  int pos = 0;
  for (int step = 0; step < 12; ++step) {
    const int n = step < 2 ? 90 : 1;
    for (int layer = 0; layer < 2; ++layer) {
      std::vector<StepInput> ins;
      std::vector<AttendInput> req;
      for (size_t i = 0; i < shapes.size(); ++i) ins.push_back(RandomStep(shapes[i], n, rng));
      for (size_t i = 0; i < shapes.size(); ++i) req.push_back(AttendInput{ids[i], pos, n, ins[i].q, ins[i].k, ins[i].v});
      std::vector<std::string> o(shapes.size());
      std::vector<AttendOutput> outs(shapes.size());
      for (size_t i = 0; i < shapes.size(); ++i) outs[i].o = &o[i];
      const AttendSummary sum = store_->Attend(tenant_, layer, kvq::DType::kBF16, req, &outs);
      ASSERT_EQ(sum.ok_entries, 3);
      EXPECT_EQ(sum.prefill, n > 1);
      for (size_t i = 0; i < shapes.size(); ++i)
        ASSERT_TRUE(o[i] == refs[i]->Step(layer, pos, n, ins[i].q, ins[i].k, ins[i].v))
            << "session " << i << " step " << step << " layer " << layer;
    }
    pos += n;
  }
}

// A worker crashed after layer 0 of a step: layer 0 is one token ahead of layer 1. Re-sending the
// whole step (same position) for every layer repairs it, and the outputs equal a clean run's.
TEST_P(StoreFlushTest, RetryAfterHalfFinishedStep) {
  TestShape s;
  s.layers = 3;
  s.config = kvq::PresetConfig(kvq::Preset::kInnerQ);
  const std::string id = Create(tenant_, s);
  ReferenceSession ref(s);
  std::mt19937_64 rng(99);
  int pos = 0;
  for (int step = 0; step < 140; ++step) {
    const int n = step == 0 ? 100 : 1;
    std::vector<StepInput> ins;
    for (int l = 0; l < s.layers; ++l) ins.push_back(RandomStep(s, n, rng));
    if (step % 9 == 4) {
      // The failed attempt: other inputs, only the first layers.
      for (int l = 0; l < 1 + step % 2; ++l) {
        const StepInput junk = RandomStep(s, n, rng);
        ASSERT_TRUE(AttendOne(tenant_, id, l, pos, n, junk).ok());
      }
      auto snap = store_->GetSession(tenant_, id);
      EXPECT_EQ(snap->layer_lengths[0], pos + n);
      EXPECT_EQ(snap->layer_lengths[s.layers - 1], pos);
    }
    for (int l = 0; l < s.layers; ++l) {
      std::string o;
      ASSERT_TRUE(AttendOne(tenant_, id, l, pos, n, ins[l], &o).ok()) << "step " << step << " layer " << l;
      ASSERT_TRUE(o == ref.Step(l, pos, n, ins[l].q, ins[l].k, ins[l].v)) << "step " << step << " layer " << l;
    }
    pos += n;
  }
  auto snap = store_->GetSession(tenant_, id);
  for (int l = 0; l < s.layers; ++l) EXPECT_EQ(snap->layer_lengths[l], pos);
  EXPECT_EQ(store_->Stats().tokens, pos);
  EXPECT_EQ(tenant_.tokens(), pos);
}

// Every kind of bad entry gets its exact code, leaves its session exactly as it was, and does not
// disturb the good entries of the same request.
TEST_F(StoreTest, BadEntriesFailAloneAndChangeNothing) {
  TestShape s;
  TestShape bf = s;
  bf.dtype = kvq::DType::kBF16;
  const std::string good = Create(tenant_, s), victim = Create(tenant_, s), foreign = Create(other_, s);
  const std::string bf_id = Create(tenant_, bf);
  std::mt19937_64 rng(5);
  // Give the victim some history so "unchanged" means something.
  for (int l = 0; l < 2; ++l) ASSERT_TRUE(AttendOne(tenant_, victim, l, 0, 40, RandomStep(s, 40, rng)).ok());
  ReferenceSession ref(s);
  int good_pos = 0;

  struct Case {
    std::string name;
    std::function<void(AttendInput*, StepInput*)> mutate;
    absl::StatusCode code;
    std::string message_part;
  };
  const size_t qn = size_t(4) * 64, kn = size_t(2) * 64;
  std::vector<Case> cases = {
      {"short q", [](AttendInput* e, StepInput* in) { in->q.resize(in->q.size() - 2); }, absl::StatusCode::kInvalidArgument, "q has"},
      {"long k", [](AttendInput* e, StepInput* in) { in->k += "xx"; }, absl::StatusCode::kInvalidArgument, "k has"},
      {"v for 2 tokens", [](AttendInput* e, StepInput* in) { in->v += in->v; }, absl::StatusCode::kInvalidArgument, "v has"},
      {"n = 0", [](AttendInput* e, StepInput*) { e->num_tokens = 0; }, absl::StatusCode::kInvalidArgument, "num_tokens"},
      {"NaN in k", [&](AttendInput*, StepInput* in) { testing::SetActAt(&in->k, kn - 1, 0x7E00); }, absl::StatusCode::kInvalidArgument, "NaN"},
      {"inf in v", [](AttendInput*, StepInput* in) { testing::SetActAt(&in->v, 3, 0xFC00); }, absl::StatusCode::kInvalidArgument, "inf"},
      {"NaN in q", [&](AttendInput*, StepInput* in) { testing::SetActAt(&in->q, qn / 2, 0x7C01); }, absl::StatusCode::kInvalidArgument, "q has NaN"},
      {"position past the end", [](AttendInput* e, StepInput*) { e->position = 41; }, absl::StatusCode::kFailedPrecondition, "length is 40"},
      {"negative position", [](AttendInput* e, StepInput*) { e->position = -1; }, absl::StatusCode::kInvalidArgument, "position"},
      {"unknown session", [](AttendInput* e, StepInput*) { e->session_id = "0123456789abcdef0123456789abcdef"; }, absl::StatusCode::kNotFound, "session not found"},
      {"foreign session", [&](AttendInput* e, StepInput*) { e->session_id = foreign; }, absl::StatusCode::kNotFound, "session not found"},
  };
  for (int layer = 0; layer < 2; ++layer) {
    for (const Case& c : cases) {
      const auto before = store_->GetSession(tenant_, victim);
      StepInput bad_in = RandomStep(s, 1, rng);
      AttendInput bad{victim, 40, 1, {}, {}, {}};
      c.mutate(&bad, &bad_in);
      bad.q = bad_in.q;
      bad.k = bad_in.k;
      bad.v = bad_in.v;
      const StepInput good_in = RandomStep(s, 1, rng);
      std::vector<AttendInput> req{AttendInput{good, good_pos, 1, good_in.q, good_in.k, good_in.v}, bad};
      std::string o_good, o_bad;
      std::vector<AttendOutput> outs(2);
      outs[0].o = &o_good;
      outs[1].o = &o_bad;
      store_->Attend(tenant_, layer, kvq::DType::kF16, req, &outs);
      EXPECT_TRUE(outs[0].status.ok()) << c.name << ": " << outs[0].status;
      EXPECT_EQ(outs[1].status.code(), c.code) << c.name << ": " << outs[1].status;
      EXPECT_NE(outs[1].status.message().find(c.message_part), std::string::npos) << c.name << ": " << outs[1].status;
      EXPECT_TRUE(o_bad.empty()) << c.name;
      EXPECT_TRUE(o_good == ref.Step(layer, good_pos, 1, good_in.q, good_in.k, good_in.v)) << c.name;
      good_pos += 1;
      const auto after = store_->GetSession(tenant_, victim);
      EXPECT_EQ(after->layer_lengths, before->layer_lengths) << c.name;
      EXPECT_EQ(after->bytes.total(), before->bytes.total()) << c.name;
      EXPECT_EQ(tenant_.bytes(), store_->Stats().pool_used) << c.name;
    }
    // Layer 1 of the good session starts again from position 0.
    good_pos = 0;
  }
  // Request-level checks: layer out of range and dtype mismatch fail every entry.
  const StepInput in = RandomStep(s, 1, rng);
  EXPECT_EQ(AttendOne(tenant_, victim, 2, 40, 1, in).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AttendOne(tenant_, victim, -1, 40, 1, in).code(), absl::StatusCode::kInvalidArgument);
  absl::Status st = AttendOne(tenant_, victim, 0, 40, 1, in, nullptr, kvq::DType::kBF16);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("dtype mismatch"), std::string::npos) << st;
  // bf16 values beyond fp16 range are rejected in k/v (the scales are fp16), allowed in q.
  StepInput big = RandomStep(bf, 1, rng);
  testing::SetActAt(&big.k, 7, kvq::FloatToBf16Bits(1e5f));
  st = AttendOne(tenant_, bf_id, 0, 0, 1, big, nullptr, kvq::DType::kBF16);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("65504"), std::string::npos) << st;
  big = RandomStep(bf, 1, rng);
  testing::SetActAt(&big.q, 7, kvq::FloatToBf16Bits(1e5f));
  EXPECT_TRUE(AttendOne(tenant_, bf_id, 0, 0, 1, big, nullptr, kvq::DType::kBF16).ok());
  EXPECT_EQ(store_->GetSession(tenant_, victim)->layer_lengths, std::vector<int32_t>({40, 40}));
}

TEST_F(StoreTest, DuplicateSessionInOneRequest) {
  TestShape s;
  const std::string id = Create(tenant_, s);
  std::mt19937_64 rng(11);
  const StepInput a = RandomStep(s, 1, rng), b = RandomStep(s, 1, rng);
  std::vector<AttendInput> req{AttendInput{id, 0, 1, a.q, a.k, a.v}, AttendInput{id, 0, 1, b.q, b.k, b.v}};
  std::string o0, o1;
  std::vector<AttendOutput> outs(2);
  outs[0].o = &o0;
  outs[1].o = &o1;
  store_->Attend(tenant_, 0, kvq::DType::kF16, req, &outs);
  EXPECT_TRUE(outs[0].status.ok());
  EXPECT_EQ(outs[1].status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetSession(tenant_, id)->layer_lengths[0], 1);
}

TEST_F(StoreTest, QuotasAndLimits) {
  StoreOptions opts;
  opts.max_sessions = 3;
  MakeStore(int64_t{64} << 20, opts);
  Tenant small("small", TenantQuota{2, 100, 0});
  TestShape s;
  s.config = kvq::PresetConfig(kvq::Preset::kFp16);
  const std::string a = Create(small, s), b = Create(small, s);
  auto c = store_->CreateSession(small, SpecOf(s));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(c.status().message().find("session quota"), std::string::npos);
  Create(tenant_, s);
  auto d = store_->CreateSession(tenant_, SpecOf(s));  // the store-wide limit
  EXPECT_EQ(d.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(d.status().message().find("maximum of 3"), std::string::npos);

  // Token quota: 100 tokens over the tenant's sessions.
  std::mt19937_64 rng(3);
  ASSERT_TRUE(AttendOne(small, a, 0, 0, 60, RandomStep(s, 60, rng)).ok());
  ASSERT_TRUE(AttendOne(small, a, 1, 0, 60, RandomStep(s, 60, rng)).ok());  // same tokens, other layer
  EXPECT_EQ(small.tokens(), 60);
  absl::Status st = AttendOne(small, b, 0, 0, 41, RandomStep(s, 41, rng));
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("token quota"), std::string::npos) << st;
  EXPECT_EQ(store_->GetSession(small, b)->layer_lengths[0], 0);
  ASSERT_TRUE(AttendOne(small, b, 0, 0, 40, RandomStep(s, 40, rng)).ok());
  EXPECT_EQ(small.tokens(), 100);
  // A retry that truncates does not need new quota.
  ASSERT_TRUE(AttendOne(small, b, 0, 39, 1, RandomStep(s, 1, rng)).ok());
  ASSERT_TRUE(store_->DropSession(small, a).ok());
  EXPECT_EQ(small.tokens(), 40);
  EXPECT_EQ(small.sessions(), 1);
  ASSERT_TRUE(store_->DropSession(small, b).ok());  // room under the store-wide limit of 3

  // Byte quota. One fp16 page is [128][Hkv 2][D 64] x 2 bytes = 32 KiB per stream; a 2-layer
  // session needs 4 pages (128 KiB) for its first step, which admission checks at creation.
  Tenant tiny("tiny", TenantQuota{0, 0, 150000});
  const std::string t = Create(tiny, s);
  ASSERT_TRUE(AttendOne(tiny, t, 0, 0, 129, RandomStep(s, 129, rng)).ok());  // 2 pages per stream
  EXPECT_EQ(tiny.bytes(), 4 * 32768);
  auto refused = store_->CreateSession(tiny, SpecOf(s));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("byte quota"), std::string::npos) << refused.status();
  st = AttendOne(tiny, t, 1, 0, 129, RandomStep(s, 129, rng));
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("byte quota"), std::string::npos) << st;
  EXPECT_EQ(tiny.bytes(), 4 * 32768);
  EXPECT_EQ(store_->GetSession(tiny, t)->layer_lengths, std::vector<int32_t>({129, 0}));
  EXPECT_EQ(tiny.bytes(), store_->GetSession(tiny, t)->bytes.total());
}

TEST_F(StoreTest, PoolExhaustionIsAnErrorNotACrash) {
  MakeStore(100000);  // room for three 32 KiB pages
  TestShape s;
  s.layers = 1;
  s.config = kvq::PresetConfig(kvq::Preset::kFp16);
  const std::string a = Create(tenant_, s), b = Create(tenant_, s);
  std::mt19937_64 rng(4);
  ASSERT_TRUE(AttendOne(tenant_, a, 0, 0, 1, RandomStep(s, 1, rng)).ok());  // K and V pages
  absl::Status st = AttendOne(tenant_, b, 0, 0, 1, RandomStep(s, 1, rng));
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("page pool exhausted"), std::string::npos) << st;
  EXPECT_EQ(store_->GetSession(tenant_, b)->layer_lengths[0], 0);
  // Admission: a session that could not take one step is refused at creation.
  auto c = store_->CreateSession(tenant_, SpecOf(s));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(c.status().message().find("page pool has"), std::string::npos) << c.status();
  EXPECT_EQ(store_->Stats().sessions, 2);
  const int64_t used = store_->Stats().pool_used;
  ASSERT_TRUE(store_->DropSession(tenant_, a).ok());
  EXPECT_LT(store_->Stats().pool_used, used);
  EXPECT_TRUE(AttendOne(tenant_, b, 0, 0, 1, RandomStep(s, 1, rng)).ok());
  EXPECT_EQ(tenant_.bytes(), store_->Stats().pool_used);
}

TEST_F(StoreTest, PerSessionMaxTokens) {
  TestShape s;
  SessionSpec spec = SpecOf(s);
  spec.max_tokens = 10;
  auto id = store_->CreateSession(tenant_, spec);
  ASSERT_TRUE(id.ok());
  std::mt19937_64 rng(8);
  ASSERT_TRUE(AttendOne(tenant_, *id, 0, 0, 10, RandomStep(s, 10, rng)).ok());
  absl::Status st = AttendOne(tenant_, *id, 0, 10, 1, RandomStep(s, 1, rng));
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("max_tokens"), std::string::npos);
}

// Random, mostly malformed requests: every entry ends OK or with a clean error, and the books
// stay balanced after each request (tenant bytes == pool bytes, token totals == session lengths).
TEST_F(StoreTest, RandomMalformedRequestsKeepTheBooksBalanced) {
  std::mt19937_64 rng(2718);
  std::vector<TestShape> shapes(3);
  shapes[0].config = kvq::PresetConfig(kvq::Preset::kInnerQ);
  shapes[1].config = kvq::PresetConfig(kvq::Preset::kKivi2);
  shapes[2].config = kvq::PresetConfig(kvq::Preset::kFp16);
  shapes[2].layers = 3;
  std::vector<std::string> ids;
  for (const TestShape& s : shapes) ids.push_back(Create(tenant_, s));
  std::uniform_int_distribution<int> pick(0, 99);
  int ok = 0, failed = 0;
  for (int it = 0; it < 300; ++it) {
    const int layer = pick(rng) < 90 ? pick(rng) % 2 : pick(rng) % 5 - 1;
    const int entries = 1 + pick(rng) % 4;
    std::vector<StepInput> ins;
    std::vector<AttendInput> req;
    for (int e = 0; e < entries; ++e) {
      const int si = pick(rng) % 3;
      const TestShape& s = shapes[si];
      auto snap = store_->GetSession(tenant_, ids[si]);
      const int len = snap->layer_lengths[std::clamp(layer, 0, s.layers - 1)];
      int n = pick(rng) < 80 ? 1 : 1 + pick(rng) % 70;
      ins.push_back(RandomStep(s, n, rng));
      StepInput& in = ins.back();
      int pos = len;
      switch (pick(rng) % 10) {
        case 0: pos = len - pick(rng) % 5; break;                  // retry / rollback (maybe too far)
        case 1: pos = len + 1 + pick(rng) % 3; break;              // gap
        case 2: in.k.resize(in.k.size() / 2); break;               // short k
        case 3: testing::SetActAt(&in.v, pick(rng), 0x7C00); break;  // inf
        case 4: n = 0; break;
        case 5: in.q += in.q; break;
        default: break;
      }
      req.push_back(AttendInput{ids[si], pos, n, {}, {}, {}});
    }
    for (int e = 0; e < entries; ++e) {
      req[e].q = ins[e].q;
      req[e].k = ins[e].k;
      req[e].v = ins[e].v;
    }
    std::vector<std::string> o(entries);
    std::vector<AttendOutput> outs(entries);
    for (int e = 0; e < entries; ++e) outs[e].o = &o[e];
    store_->Attend(tenant_, layer, kvq::DType::kF16, req, &outs);
    for (int e = 0; e < entries; ++e) {
      if (outs[e].status.ok()) {
        ++ok;
        EXPECT_EQ(o[e].size(), req[e].q.size());
      } else {
        ++failed;
        EXPECT_TRUE(o[e].empty());
        const absl::StatusCode c = outs[e].status.code();
        EXPECT_TRUE(c == absl::StatusCode::kInvalidArgument || c == absl::StatusCode::kFailedPrecondition)
            << outs[e].status;
      }
    }
    ASSERT_EQ(tenant_.bytes(), store_->Stats().pool_used) << "request " << it;
    int64_t tokens = 0, bytes = 0;
    for (const std::string& id : ids) {
      auto snap = store_->GetSession(tenant_, id);
      tokens += *std::max_element(snap->layer_lengths.begin(), snap->layer_lengths.end());
      bytes += snap->bytes.total();
    }
    ASSERT_EQ(store_->Stats().tokens, tokens) << "request " << it;
    ASSERT_EQ(tenant_.tokens(), tokens) << "request " << it;
    ASSERT_EQ(store_->Stats().bytes.total(), bytes) << "request " << it;
    ASSERT_LE(bytes, store_->Stats().pool_used);
  }
  EXPECT_GT(ok, 100);
  EXPECT_GT(failed, 50);
  for (const std::string& id : ids) ASSERT_TRUE(store_->DropSession(tenant_, id).ok());
  EXPECT_EQ(store_->Stats().pool_used, 0);
  EXPECT_EQ(tenant_.bytes(), 0);
  EXPECT_EQ(backend_->pool().bad_frees(), 0);
}

// Concurrent requests over overlapping sets of sessions, in different orders: no deadlock, and the
// final lengths are exact.
TEST_F(StoreTest, ConcurrentRequestsOnSharedSessions) {
  TestShape s;
  s.layers = 1;
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(Create(tenant_, s));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int it = 0; it < 50; ++it) {
        // Each thread appends to all sessions, listed in a thread-specific order; positions come
        // from GetSession, so some entries race and fail with FAILED_PRECONDITION (never corrupt).
        std::vector<int> order{0, 1, 2, 3};
        std::rotate(order.begin(), order.begin() + t, order.end());
        std::vector<StepInput> ins;
        std::vector<AttendInput> req;
        for (int i : order) {
          auto snap = store_->GetSession(tenant_, ids[i]);
          ins.push_back(RandomStep(s, 1, rng));
          req.push_back(AttendInput{ids[i], snap->layer_lengths[0], 1, {}, {}, {}});
        }
        for (size_t j = 0; j < req.size(); ++j) {
          req[j].q = ins[j].q;
          req[j].k = ins[j].k;
          req[j].v = ins[j].v;
        }
        std::vector<std::string> o(4);
        std::vector<AttendOutput> outs(4);
        for (int j = 0; j < 4; ++j) outs[j].o = &o[j];
        store_->Attend(tenant_, 0, kvq::DType::kF16, req, &outs);
        for (int j = 0; j < 4; ++j) {
          if (!outs[j].status.ok()) {
            EXPECT_EQ(outs[j].status.code(), absl::StatusCode::kFailedPrecondition) << outs[j].status;
          }
        }
      }
    });
  for (auto& th : threads) th.join();
  int64_t total = 0;
  for (int i = 0; i < 4; ++i) {
    const int len = store_->GetSession(tenant_, ids[i])->layer_lengths[0];
    EXPECT_GT(len, 0);
    EXPECT_LE(len, 200);
    total += len;
  }
  EXPECT_EQ(store_->Stats().tokens, total);
  EXPECT_EQ(tenant_.tokens(), total);
}

}  // namespace
}  // namespace kvq::store
