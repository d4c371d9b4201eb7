// The store's gRPC service in-process on 127.0.0.1 (port 0), driven by the generated client:
// sessions, multi-session multi-layer decode and chunked prefill against the independent
// reference, the retry after a half-finished step, every bad input with its exact status code,
// authentication and tenant isolation. The service tests run on both backends: CPU (outputs equal
// to the reference's, bit for bit) and CUDA (the same codes, the attention within the GPU tests'
// normalized error of the reference; skipped, visibly, without a CUDA device).
#include <algorithm>
#include <cmath>
#include <random>
#include <thread>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstore.grpc.pb.h"
#include "kvstore/convert.h"
#include "kvstore/backend.h"
#include "kvstore/cpu_backend.h"
#include "kvstore/server.h"
#include "test_util.h"

namespace kvq::store {
namespace {

using testing::RandomStep;
using testing::ReferenceSession;
using testing::StepInput;
using testing::TestShape;

constexpr char kTenants[] =
    "alpha-token-0001 alpha 0 0 0\n"
    "beta-token-00001 beta 1 0 0\n";

// Every preset and dtype maps to the proto and back, and a preset's expanded config survives the
// explicit-config path unchanged.
TEST(Convert, EnumsAndConfigsRoundTrip) {
  for (kvq::Preset p : {kvq::Preset::kFp16, kvq::Preset::kKivi2, kvq::Preset::kKivi4, kvq::Preset::kInnerQ,
                        kvq::Preset::kInnerQ2, kvq::Preset::kInnerQBase}) {
    auto back = FromProto(ToProto(p));
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, p);
    EXPECT_EQ(v1::Preset_Name(ToProto(p)), std::string("PRESET_") + [&] {
      std::string n = kvq::PresetName(p);
      for (char& ch : n) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      return n;
    }());
    const kvq::QuantConfig c = kvq::PresetConfig(p);
    auto cb = FromProto(ToProto(c));
    ASSERT_TRUE(cb.ok()) << cb.status();
    EXPECT_EQ(ToProto(*cb).SerializeAsString(), ToProto(c).SerializeAsString());
    EXPECT_EQ(kvq::ValidateConfig(*cb, 64), "");
  }
  for (kvq::DType d : {kvq::DType::kF16, kvq::DType::kBF16}) EXPECT_EQ(*FromProto(ToProto(d)), d);
  EXPECT_FALSE(FromProto(v1::DTYPE_UNSPECIFIED).ok());
  EXPECT_FALSE(FromProto(static_cast<v1::DType>(77)).ok());
  EXPECT_FALSE(FromProto(v1::PRESET_UNSPECIFIED).ok());
  EXPECT_EQ(ToGrpcCode(absl::StatusCode::kFailedPrecondition), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(ToGrpcCode(absl::StatusCode::kUnauthenticated), grpc::StatusCode::UNAUTHENTICATED);
  for (int c = 0; c <= 16; ++c) EXPECT_EQ(static_cast<int>(ToGrpcCode(static_cast<absl::StatusCode>(c))), c);
}

// The backend under test: "cpu" or "cuda".
class ServiceTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    cuda_ = std::string(GetParam()) == "cuda";
    if (cuda_) {
      BackendOptions bo;
      bo.cuda_lanes = 2;
      auto probe = MakeBackend(BackendKind::kCuda, int64_t{1} << 20, bo);
      if (!probe.ok()) GTEST_SKIP() << "the service on the CUDA backend not run: " << probe.status();
    }
    Start(int64_t{8} << 20);
  }

  void Start(int64_t max_message_bytes) {
    server_.reset();
    BackendOptions bo;
    bo.threads = 2;
    bo.cuda_lanes = 2;
    auto backend = MakeBackend(cuda_ ? BackendKind::kCuda : BackendKind::kCpu, int64_t{128} << 20, bo);
    ASSERT_TRUE(backend.ok()) << backend.status();
    auto tenants = TenantRegistry::Parse(kTenants);
    ASSERT_TRUE(tenants.ok());
    ServerOptions so;
    so.host = "127.0.0.1";
    so.port = 0;
    so.metrics_port = -1;
    so.max_message_bytes = max_message_bytes;
    auto server = StoreServer::Start(so, StoreOptions{}, std::move(backend).value(), std::move(tenants).value());
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(server).value();
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(server_->port()),
                                         grpc::InsecureChannelCredentials(), args);
    stub_ = v1::KVStore::NewStub(channel_);
  }

  // An output against the reference's: equal on the CPU backend (the reference is the same code);
  // on CUDA the same size, no NaN and a normalized error below 2e-3 (fp16; the GPU tests' bound).
  ::testing::AssertionResult SameOutput(const std::string& got, const std::string& want) const {
    if (!cuda_) {
      if (got == want) return ::testing::AssertionSuccess();
      return ::testing::AssertionFailure() << "o differs from the reference";
    }
    if (got.size() != want.size())
      return ::testing::AssertionFailure() << "o has " << got.size() << " bytes, the reference " << want.size();
    const double err = testing::NormErr(got, want, kvq::DType::kF16);
    if (err < 2e-3) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "normalized error " << err << " against the reference (inf: a NaN)";
  }

  static void Auth(grpc::ClientContext* ctx, const std::string& token) {
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
  }

  static v1::CreateSessionRequest CreateReq(const TestShape& s, v1::Preset preset) {
    v1::CreateSessionRequest req;
    req.mutable_shape()->set_num_layers(s.layers);
    req.mutable_shape()->set_num_q_heads(s.hq);
    req.mutable_shape()->set_num_kv_heads(s.hkv);
    req.mutable_shape()->set_head_dim(s.d);
    req.mutable_shape()->set_dtype(s.dtype == kvq::DType::kF16 ? v1::DTYPE_F16 : v1::DTYPE_BF16);
    req.set_preset(preset);
    return req;
  }

  grpc::Status Create(const v1::CreateSessionRequest& req, std::string* id, const std::string& token = kAlpha) {
    grpc::ClientContext ctx;
    Auth(&ctx, token);
    v1::CreateSessionResponse resp;
    grpc::Status st = stub_->CreateSession(&ctx, req, &resp);
    if (st.ok()) {
      *id = resp.session_id();
      EXPECT_EQ(resp.format_version(), kvq::kFormatVersion);
    }
    return st;
  }

  grpc::Status Get(const std::string& id, v1::SessionInfo* info, const std::string& token = kAlpha) {
    grpc::ClientContext ctx;
    Auth(&ctx, token);
    v1::GetSessionRequest req;
    req.set_session_id(id);
    v1::GetSessionResponse resp;
    grpc::Status st = stub_->GetSession(&ctx, req, &resp);
    if (info != nullptr) *info = resp.session();
    return st;
  }

  static v1::AttendEntry* AddEntry(v1::AttendRequest* req, const std::string& id, int pos, int n,
                                   const StepInput& in) {
    v1::AttendEntry* e = req->add_entries();
    e->set_session_id(id);
    e->set_position(pos);
    e->set_num_tokens(n);
    e->set_q(in.q);
    e->set_k(in.k);
    e->set_v(in.v);
    return e;
  }

  // One request on a fresh stream; returns the stream's final status.
  grpc::Status AttendOnce(const v1::AttendRequest& req, v1::AttendResponse* resp, const std::string& token = kAlpha) {
    grpc::ClientContext ctx;
    Auth(&ctx, token);
    auto stream = stub_->Attend(&ctx);
    stream->Write(req);
    stream->WritesDone();
    const bool got = stream->Read(resp);
    grpc::Status st = stream->Finish();
    if (st.ok()) {
      EXPECT_TRUE(got);
    }
    return st;
  }

  static constexpr const char* kAlpha = "alpha-token-0001";
  static constexpr const char* kBeta = "beta-token-00001";
  bool cuda_ = false;
  std::unique_ptr<StoreServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KVStore::Stub> stub_;
};

TEST_P(ServiceTest, SessionRpcs) {
  TestShape s;
  std::string id;
  ASSERT_TRUE(Create(CreateReq(s, v1::PRESET_INNERQ), &id).ok());
  v1::SessionInfo info;
  ASSERT_TRUE(Get(id, &info).ok());
  EXPECT_EQ(info.session_id(), id);
  EXPECT_EQ(info.format_version(), kvq::kFormatVersion);
  EXPECT_EQ(info.preset(), v1::PRESET_INNERQ);
  EXPECT_EQ(info.config().sink(), 32);
  EXPECT_TRUE(info.config().key_norm());
  EXPECT_EQ(info.config().k().mode(), v1::QUANT_MODE_SYM);
  EXPECT_EQ(info.config().v().grouping(), v1::GROUPING_ALONG_TOKENS);
  EXPECT_EQ(info.layer_lengths_size(), s.layers);
  EXPECT_EQ(info.shape().num_q_heads(), s.hq);

  // An explicit config (here: kivi2 spelled out, with 64-token groups for V).
  v1::CreateSessionRequest req = CreateReq(s, v1::PRESET_FP16);
  v1::QuantConfig* c = req.mutable_config();
  c->mutable_k()->set_mode(v1::QUANT_MODE_ASYM);
  c->mutable_k()->set_bits(2);
  c->mutable_k()->set_grouping(v1::GROUPING_ALONG_TOKENS);
  c->mutable_k()->set_group_size(32);
  c->mutable_k()->set_flush(128);
  c->mutable_v()->set_mode(v1::QUANT_MODE_ASYM);
  c->mutable_v()->set_bits(2);
  c->mutable_v()->set_grouping(v1::GROUPING_ALONG_CHANNELS);
  c->mutable_v()->set_group_size(64);
  c->mutable_v()->set_keep(128);
  c->mutable_v()->set_flush(1);
  std::string id2;
  ASSERT_TRUE(Create(req, &id2).ok());
  ASSERT_TRUE(Get(id2, &info).ok());
  EXPECT_EQ(info.preset(), v1::PRESET_UNSPECIFIED);
  EXPECT_EQ(info.config().v().group_size(), 64);

  grpc::ClientContext lctx;
  Auth(&lctx, kAlpha);
  v1::ListSessionsResponse list;
  ASSERT_TRUE(stub_->ListSessions(&lctx, v1::ListSessionsRequest(), &list).ok());
  EXPECT_EQ(list.sessions_size(), 2);

  grpc::ClientContext dctx;
  Auth(&dctx, kAlpha);
  v1::DropSessionRequest drop;
  drop.set_session_id(id);
  v1::DropSessionResponse dresp;
  ASSERT_TRUE(stub_->DropSession(&dctx, drop, &dresp).ok());
  EXPECT_EQ(Get(id, nullptr).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_P(ServiceTest, BadCreateRequests) {
  TestShape s;
  std::string id;
  v1::CreateSessionRequest req = CreateReq(s, v1::PRESET_KIVI2);
  req.clear_preset();
  EXPECT_EQ(Create(req, &id).error_code(), grpc::StatusCode::INVALID_ARGUMENT);  // neither preset nor config
  req = CreateReq(s, v1::PRESET_UNSPECIFIED);
  EXPECT_EQ(Create(req, &id).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  req = CreateReq(s, v1::PRESET_KIVI2);
  req.mutable_shape()->set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(Create(req, &id).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  req = CreateReq(s, v1::PRESET_KIVI2);
  req.mutable_shape()->set_head_dim(96);
  grpc::Status st = Create(req, &id);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("head_dim"), std::string::npos) << st.error_message();
  req = CreateReq(s, v1::PRESET_KIVI2);
  req.mutable_shape()->set_num_q_heads(5);
  EXPECT_EQ(Create(req, &id).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  req = CreateReq(s, v1::PRESET_KIVI2);
  req.mutable_config()->mutable_k()->set_mode(v1::QUANT_MODE_ASYM);
  req.mutable_config()->mutable_k()->set_bits(5);
  req.mutable_config()->mutable_k()->set_grouping(v1::GROUPING_ALONG_CHANNELS);
  req.mutable_config()->mutable_k()->set_group_size(32);
  req.mutable_config()->mutable_v()->set_mode(v1::QUANT_MODE_FULL);
  st = Create(req, &id);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("bits"), std::string::npos) << st.error_message();
}

// SmolLM's attention shape (Hq 9, Hkv 3, D 64), three sessions with different presets, three
// layers, chunked prefill of different lengths then decode, one stream; outputs equal the
// reference bit for bit.
TEST_P(ServiceTest, DecodeAndChunkedPrefillMatchTheReference) {
  const v1::Preset presets[] = {v1::PRESET_KIVI2, v1::PRESET_INNERQ, v1::PRESET_INNERQ2};
  const kvq::Preset kpresets[] = {kvq::Preset::kKivi2, kvq::Preset::kInnerQ, kvq::Preset::kInnerQ2};
  const int prefill[] = {150, 200, 100};
  std::vector<TestShape> shapes;
  std::vector<std::string> ids;
  std::vector<std::unique_ptr<ReferenceSession>> refs;
  for (int i = 0; i < 3; ++i) {
    TestShape s;
    s.layers = 3;
    s.hq = 9;
    s.hkv = 3;
    s.config = kvq::PresetConfig(kpresets[i]);
    shapes.push_back(s);
    std::string id;
    ASSERT_TRUE(Create(CreateReq(s, presets[i]), &id).ok());
    ids.push_back(id);
    refs.push_back(std::make_unique<ReferenceSession>(s));
  }
  grpc::ClientContext ctx;
  Auth(&ctx, kAlpha);
  auto stream = stub_->Attend(&ctx);
  std::mt19937_64 rng(2024);
  std::vector<int> pos(3, 0);
  uint64_t step_id = 0;
  for (int step = 0; step < 40; ++step) {
    std::vector<int> n(3);
    for (int i = 0; i < 3; ++i) n[i] = pos[i] < prefill[i] ? std::min(64, prefill[i] - pos[i]) : 1;
    for (int layer = 0; layer < 3; ++layer) {
      v1::AttendRequest req;
      req.set_step_id(++step_id);
      req.set_layer(layer);
      req.set_dtype(v1::DTYPE_F16);
      std::vector<StepInput> ins;
      for (int i = 0; i < 3; ++i) {
        ins.push_back(RandomStep(shapes[i], n[i], rng));
        AddEntry(&req, ids[i], pos[i], n[i], ins[i]);
      }
      ASSERT_TRUE(stream->Write(req));
      v1::AttendResponse resp;
      ASSERT_TRUE(stream->Read(&resp));
      EXPECT_EQ(resp.step_id(), step_id);
      EXPECT_EQ(resp.layer(), layer);
      ASSERT_EQ(resp.results_size(), 3);
      for (int i = 0; i < 3; ++i) {
        const v1::EntryResult& r = resp.results(i);
        ASSERT_EQ(r.code(), 0) << r.message();
        EXPECT_EQ(r.length(), pos[i] + n[i]);
        ASSERT_TRUE(SameOutput(r.o(), refs[i]->Step(layer, pos[i], n[i], ins[i].q, ins[i].k, ins[i].v)))
            << "session " << i << " step " << step << " layer " << layer;
      }
    }
    for (int i = 0; i < 3; ++i) pos[i] += n[i];
  }
  stream->WritesDone();
  ASSERT_TRUE(stream->Finish().ok());
  for (int i = 0; i < 3; ++i) {
    v1::SessionInfo info;
    ASSERT_TRUE(Get(ids[i], &info).ok());
    for (int l = 0; l < 3; ++l) EXPECT_EQ(info.layer_lengths(l), pos[i]);
    EXPECT_LT(info.bytes().total(), info.fp16_equivalent_bytes() + 3 * 2 * 128 * 3 * 64 * 2 * 2);
    EXPECT_GT(info.bytes().codes(), 0);
  }
}

// The worker dies after layer 0 of a step (its stream is cancelled); a new stream re-sends the whole
// step; outputs equal a clean run.
TEST_P(ServiceTest, RetryAfterHalfFinishedStepOnANewStream) {
  TestShape s;
  s.layers = 4;
  s.config = kvq::PresetConfig(kvq::Preset::kKivi2);
  std::string id;
  ASSERT_TRUE(Create(CreateReq(s, v1::PRESET_KIVI2), &id).ok());
  ReferenceSession ref(s);
  std::mt19937_64 rng(77);
  int pos = 0;
  for (int step = 0; step < 6; ++step) {
    const int n = step == 0 ? 130 : 1;
    {
      // The failed attempt: layers 0 and 1 advance, then the worker dies.
      grpc::ClientContext ctx;
      Auth(&ctx, kAlpha);
      auto stream = stub_->Attend(&ctx);
      for (int layer = 0; layer < 2; ++layer) {
        v1::AttendRequest req;
        req.set_layer(layer);
        req.set_dtype(v1::DTYPE_F16);
        AddEntry(&req, id, pos, n, RandomStep(s, n, rng));
        ASSERT_TRUE(stream->Write(req));
        v1::AttendResponse resp;
        ASSERT_TRUE(stream->Read(&resp));
        ASSERT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
      }
      ctx.TryCancel();
      EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
    }
    v1::SessionInfo info;
    ASSERT_TRUE(Get(id, &info).ok());
    EXPECT_EQ(info.layer_lengths(0), pos + n);
    EXPECT_EQ(info.layer_lengths(3), pos);
    grpc::ClientContext ctx;
    Auth(&ctx, kAlpha);
    auto stream = stub_->Attend(&ctx);
    for (int layer = 0; layer < s.layers; ++layer) {
      v1::AttendRequest req;
      req.set_layer(layer);
      req.set_dtype(v1::DTYPE_F16);
      const StepInput in = RandomStep(s, n, rng);
      AddEntry(&req, id, pos, n, in);
      ASSERT_TRUE(stream->Write(req));
      v1::AttendResponse resp;
      ASSERT_TRUE(stream->Read(&resp));
      ASSERT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
      ASSERT_TRUE(SameOutput(resp.results(0).o(), ref.Step(layer, pos, n, in.q, in.k, in.v))) << "step " << step;
    }
    stream->WritesDone();
    ASSERT_TRUE(stream->Finish().ok());
    pos += n;
  }
}

TEST_P(ServiceTest, EveryBadEntryGetsItsExactCode) {
  TestShape s;
  std::string id, foreign, bf_id;
  ASSERT_TRUE(Create(CreateReq(s, v1::PRESET_KIVI2), &id).ok());
  ASSERT_TRUE(Create(CreateReq(s, v1::PRESET_KIVI2), &foreign, kBeta).ok());
  std::mt19937_64 rng(31);
  {
    v1::AttendRequest req;
    req.set_layer(0);
    req.set_dtype(v1::DTYPE_F16);
    AddEntry(&req, id, 0, 5, RandomStep(s, 5, rng));
    v1::AttendResponse resp;
    ASSERT_TRUE(AttendOnce(req, &resp).ok());
    ASSERT_EQ(resp.results(0).code(), 0);
  }
  struct Case {
    const char* name;
    std::function<void(v1::AttendRequest*)> mutate;
    grpc::StatusCode code;
    const char* message_part;
  };
  const Case cases[] = {
      {"q too short", [](v1::AttendRequest* r) { r->mutable_entries(0)->mutable_q()->resize(10); },
       grpc::StatusCode::INVALID_ARGUMENT, "q has 10 bytes"},
      {"k too long", [](v1::AttendRequest* r) { r->mutable_entries(0)->mutable_k()->append("zz"); },
       grpc::StatusCode::INVALID_ARGUMENT, "k has"},
      {"num_tokens mismatch", [](v1::AttendRequest* r) { r->mutable_entries(0)->set_num_tokens(2); },
       grpc::StatusCode::INVALID_ARGUMENT, "want"},
      {"NaN in k", [](v1::AttendRequest* r) { testing::SetActAt(r->mutable_entries(0)->mutable_k(), 17, 0x7E00); },
       grpc::StatusCode::INVALID_ARGUMENT, "k has NaN or inf at element 17"},
      {"inf in v", [](v1::AttendRequest* r) { testing::SetActAt(r->mutable_entries(0)->mutable_v(), 0, 0x7C00); },
       grpc::StatusCode::INVALID_ARGUMENT, "v has NaN or inf"},
      {"unknown session", [](v1::AttendRequest* r) { r->mutable_entries(0)->set_session_id("nope"); },
       grpc::StatusCode::NOT_FOUND, "session not found"},
      {"foreign session", [&](v1::AttendRequest* r) { r->mutable_entries(0)->set_session_id(foreign); },
       grpc::StatusCode::NOT_FOUND, "session not found"},
      {"layer out of range", [](v1::AttendRequest* r) { r->set_layer(2); }, grpc::StatusCode::INVALID_ARGUMENT,
       "layer 2 out of range"},
      {"position gap", [](v1::AttendRequest* r) { r->mutable_entries(0)->set_position(7); },
       grpc::StatusCode::FAILED_PRECONDITION, "length is 5"},
      {"dtype mismatch", [](v1::AttendRequest* r) { r->set_dtype(v1::DTYPE_BF16); }, grpc::StatusCode::INVALID_ARGUMENT,
       "dtype mismatch"},
      {"dtype missing", [](v1::AttendRequest* r) { r->set_dtype(v1::DTYPE_UNSPECIFIED); },
       grpc::StatusCode::INVALID_ARGUMENT, "dtype"},
  };
  for (const Case& c : cases) {
    v1::AttendRequest req;
    req.set_step_id(42);
    req.set_layer(0);
    req.set_dtype(v1::DTYPE_F16);
    AddEntry(&req, id, 5, 1, RandomStep(s, 1, rng));
    c.mutate(&req);
    v1::AttendResponse resp;
    ASSERT_TRUE(AttendOnce(req, &resp).ok()) << c.name;
    ASSERT_EQ(resp.results_size(), 1) << c.name;
    EXPECT_EQ(resp.step_id(), 42u);
    EXPECT_EQ(resp.results(0).code(), static_cast<int>(c.code)) << c.name << ": " << resp.results(0).message();
    EXPECT_NE(resp.results(0).message().find(c.message_part), std::string::npos)
        << c.name << ": " << resp.results(0).message();
    EXPECT_TRUE(resp.results(0).o().empty());
    v1::SessionInfo info;
    ASSERT_TRUE(Get(id, &info).ok());
    EXPECT_EQ(info.layer_lengths(0), 5) << c.name;
    EXPECT_EQ(info.layer_lengths(1), 0) << c.name;
  }
  // The foreign session was not touched either.
  v1::SessionInfo info;
  ASSERT_TRUE(Get(foreign, &info, kBeta).ok());
  EXPECT_EQ(info.layer_lengths(0), 0);
}

TEST_P(ServiceTest, AuthenticationAndQuotas) {
  TestShape s;
  std::string id;
  EXPECT_EQ(Create(CreateReq(s, v1::PRESET_KIVI2), &id, "").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Create(CreateReq(s, v1::PRESET_KIVI2), &id, "wrong-token-123").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Get("x", nullptr, "").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  {
    grpc::ClientContext ctx;
    v1::ListSessionsResponse resp;
    EXPECT_EQ(stub_->ListSessions(&ctx, v1::ListSessionsRequest(), &resp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  v1::AttendRequest req;
  req.set_dtype(v1::DTYPE_F16);
  v1::AttendResponse resp;
  EXPECT_EQ(AttendOnce(req, &resp, "").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(AttendOnce(req, &resp, "wrong-token-123").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // beta may hold one session.
  ASSERT_TRUE(Create(CreateReq(s, v1::PRESET_KIVI2), &id, kBeta).ok());
  std::string id2;
  grpc::Status st = Create(CreateReq(s, v1::PRESET_KIVI2), &id2, kBeta);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(st.error_message().find("quota"), std::string::npos);
}

TEST_P(ServiceTest, TenantIsolation) {
  TestShape s;
  std::string a, b;
  ASSERT_TRUE(Create(CreateReq(s, v1::PRESET_KIVI2), &a, kAlpha).ok());
  ASSERT_TRUE(Create(CreateReq(s, v1::PRESET_KIVI2), &b, kBeta).ok());
  grpc::ClientContext lctx;
  Auth(&lctx, kBeta);
  v1::ListSessionsResponse list;
  ASSERT_TRUE(stub_->ListSessions(&lctx, v1::ListSessionsRequest(), &list).ok());
  ASSERT_EQ(list.sessions_size(), 1);
  EXPECT_EQ(list.sessions(0).session_id(), b);
  grpc::Status foreign = Get(a, nullptr, kBeta), unknown = Get("ffffffffffffffffffffffffffffffff", nullptr, kBeta);
  EXPECT_EQ(foreign.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(foreign.error_message(), unknown.error_message());  // no hint that it exists
  grpc::ClientContext dctx;
  Auth(&dctx, kBeta);
  v1::DropSessionRequest drop;
  drop.set_session_id(a);
  v1::DropSessionResponse dresp;
  EXPECT_EQ(stub_->DropSession(&dctx, drop, &dresp).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(Get(a, nullptr, kAlpha).ok());
}

TEST_P(ServiceTest, OversizedMessageEndsTheStreamNotTheServer) {
  Start(1 << 20);
  TestShape s;
  std::string id;
  ASSERT_TRUE(Create(CreateReq(s, v1::PRESET_KIVI2), &id).ok());
  std::mt19937_64 rng(6);
  const int n = 1200;  // q alone is 1200 x 4 x 64 x 2 = 600 KiB; with k and v > 1 MiB
  v1::AttendRequest req;
  req.set_dtype(v1::DTYPE_F16);
  AddEntry(&req, id, 0, n, RandomStep(s, n, rng));
  v1::AttendResponse resp;
  EXPECT_EQ(AttendOnce(req, &resp).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // The server still serves, and the session was not touched.
  v1::SessionInfo info;
  ASSERT_TRUE(Get(id, &info).ok());
  EXPECT_EQ(info.layer_lengths(0), 0);
  v1::AttendRequest ok;
  ok.set_dtype(v1::DTYPE_F16);
  AddEntry(&ok, id, 0, 100, RandomStep(s, 100, rng));
  ASSERT_TRUE(AttendOnce(ok, &resp).ok());
  EXPECT_EQ(resp.results(0).code(), 0) << resp.results(0).message();
}

TEST_P(ServiceTest, ManyConcurrentStreams) {
  TestShape s;
  s.layers = 2;
  s.config = kvq::PresetConfig(kvq::Preset::kInnerQ);
  std::vector<std::thread> workers;
  std::atomic<int> failures{0};
  for (int w = 0; w < 4; ++w)
    workers.emplace_back([&, w] {
      std::mt19937_64 rng(500 + w);
      std::string id;
      if (!Create(CreateReq(s, v1::PRESET_INNERQ), &id).ok()) {
        failures++;
        return;
      }
      ReferenceSession ref(s);
      grpc::ClientContext ctx;
      Auth(&ctx, kAlpha);
      auto stream = stub_->Attend(&ctx);
      for (int step = 0; step < 20; ++step)
        for (int layer = 0; layer < 2; ++layer) {
          v1::AttendRequest req;
          req.set_layer(layer);
          req.set_dtype(v1::DTYPE_F16);
          const StepInput in = RandomStep(s, 1, rng);
          AddEntry(&req, id, step, 1, in);
          v1::AttendResponse resp;
          if (!stream->Write(req) || !stream->Read(&resp) || resp.results(0).code() != 0 ||
              !SameOutput(resp.results(0).o(), ref.Step(layer, step, 1, in.q, in.k, in.v)))
            failures++;
        }
      stream->WritesDone();
      if (!stream->Finish().ok()) failures++;
    });
  for (auto& t : workers) t.join();
  EXPECT_EQ(failures.load(), 0);
}

// A self-signed test certificate (CN localhost, SAN localhost and 127.0.0.1, P-256, 100 years).
constexpr char kTestCert[] = R"(-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUGHKrHtM/adRuAZULTAbaU9mdJ3IwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNDEyNTQwOVoYDzIxMjYxMDMx
MTI1NDA5WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARq9q2PlJlSzP/gvt4t8juK5KHKhml7pF6hiHc32XzM157U1yNMEEEv
Xt+fUcdpl0O6quRZyjqMnvfrUnPjRsBmo28wbTAdBgNVHQ4EFgQUL9LLUzFqDqfs
ubbbuTa16nmu1vkwHwYDVR0jBBgwFoAUL9LLUzFqDqfsubbbuTa16nmu1vkwDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDSAAwRQIgJt2FRrnrkQNBdPRNznoWjgd05LyKuMG3quRRAXjobeICIQDF
qZTM5RQXCS3moZCwg2oW3go9wyIP6MBVtmGd/5mDQQ==
-----END CERTIFICATE-----
)";
constexpr char kTestKey[] = R"(-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgoX1325YUl7+v+Y9B
PUAmVqkIVYlHuNL2+NIMe+rWTKShRANCAARq9q2PlJlSzP/gvt4t8juK5KHKhml7
pF6hiHc32XzM157U1yNMEEEvXt+fUcdpl0O6quRZyjqMnvfrUnPjRsBm
-----END PRIVATE KEY-----
)";

// With a certificate and key the store speaks TLS only: a TLS client works, a plaintext one fails.
INSTANTIATE_TEST_SUITE_P(Backends, ServiceTest, ::testing::Values("cpu", "cuda"),
                         [](const ::testing::TestParamInfo<const char*>& i) { return std::string(i.param); });

TEST(ServiceTls, ServesTlsWithTheGivenCertificate) {
  auto backend = CpuBackend::Create(int64_t{16} << 20, 1);
  ASSERT_TRUE(backend.ok());
  ServerOptions so;
  so.host = "127.0.0.1";
  so.port = 0;
  so.metrics_port = -1;
  so.tls_cert_pem = kTestCert;
  so.tls_key_pem = kTestKey;
  auto server = StoreServer::Start(so, StoreOptions{}, std::move(backend).value(), TenantRegistry());
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string addr = "127.0.0.1:" + std::to_string((*server)->port());
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = kTestCert;
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  auto stub = v1::KVStore::NewStub(grpc::CreateCustomChannel(addr, grpc::SslCredentials(ssl), args));
  grpc::ClientContext ctx;
  v1::ListSessionsResponse resp;
  EXPECT_TRUE(stub->ListSessions(&ctx, v1::ListSessionsRequest(), &resp).ok());
  auto plain = v1::KVStore::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext pctx;
  pctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  EXPECT_FALSE(plain->ListSessions(&pctx, v1::ListSessionsRequest(), &resp).ok());
  // Half a TLS configuration is refused at start-up.
  auto backend2 = CpuBackend::Create(int64_t{16} << 20, 1);
  so.tls_key_pem.clear();
  EXPECT_EQ(StoreServer::Start(so, StoreOptions{}, std::move(backend2).value(), TenantRegistry()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvq::store
