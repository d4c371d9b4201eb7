#include "worker/service.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "kvq/format.h"
#include "worker/store_attention.h"

namespace kvq::worker {
namespace v1 = ::kvq::v1;

namespace {
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
}
prometheus::Histogram::BucketBoundaries CountBuckets() { return {1, 2, 4, 8, 16, 32, 64, 128, 256, 512}; }

v1::FinishReason ToProto(Finish f) {
  switch (f) {
    case Finish::kLength: return v1::FINISH_REASON_LENGTH;
    case Finish::kStop: return v1::FINISH_REASON_STOP;
    case Finish::kCancelled: return v1::FINISH_REASON_CANCELLED;
    case Finish::kContext: return v1::FINISH_REASON_CONTEXT;
    default: return v1::FINISH_REASON_UNSPECIFIED;
  }
}

// Events from the engine to one RPC handler.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<GenEvent> events;
};
}  // namespace

WorkerMetrics::WorkerMetrics(prometheus::Registry& r) {
  auto& req = prometheus::BuildCounter().Name("kvq_worker_requests_total").Help("Generate requests by result").Register(r);
  ok_ = &req.Add({{"result", "ok"}});
  error_ = &req.Add({{"result", "error"}});
  cancelled_ = &req.Add({{"result", "cancelled"}});
  tokens_ = &prometheus::BuildCounter().Name("kvq_worker_generated_tokens_total").Help("Tokens generated").Register(r).Add({});
  prompt_tokens_ = &prometheus::BuildCounter().Name("kvq_worker_prompt_tokens_total").Help("Prompt tokens received").Register(r).Add({});
  ttft_ = &prometheus::BuildHistogram().Name("kvq_worker_time_to_first_token_seconds").Help("Time from request to its first token").Register(r).Add({}, LatencyBuckets());
  itl_ = &prometheus::BuildHistogram().Name("kvq_worker_inter_token_latency_seconds").Help("Time between two tokens of a request").Register(r).Add({}, LatencyBuckets());
  store_rtt_ = &prometheus::BuildHistogram().Name("kvq_worker_store_round_trip_seconds").Help("Round trip of one layer's Attend message to the store").Register(r).Add({}, LatencyBuckets());
  step_s_ = &prometheus::BuildHistogram().Name("kvq_worker_step_duration_seconds").Help("Duration of one batched forward step").Register(r).Add({}, LatencyBuckets());
  batch_seqs_ = &prometheus::BuildHistogram().Name("kvq_worker_step_sequences").Help("Sequences in one forward step").Register(r).Add({}, CountBuckets());
  batch_tokens_ = &prometheus::BuildHistogram().Name("kvq_worker_step_tokens").Help("Token rows in one forward step").Register(r).Add({}, CountBuckets());
  in_flight_ = &prometheus::BuildGauge().Name("kvq_worker_in_flight_requests").Help("Requests queued or running").Register(r).Add({});
}

EngineObserver WorkerMetrics::Observer() {
  EngineObserver o;
  o.time_to_first_token = [this](double s) { ttft_->Observe(s); tokens_->Increment(); };
  o.inter_token = [this](double s) { itl_->Observe(s); tokens_->Increment(); };
  o.step = [this](int seqs, int toks, double s) {
    step_s_->Observe(s);
    batch_seqs_->Observe(seqs);
    batch_tokens_->Observe(toks);
  };
  o.request_done = [this](Finish f, bool err) { (err ? error_ : f == Finish::kCancelled ? cancelled_ : ok_)->Increment(); };
  return o;
}

absl::StatusOr<GenParams> WorkerService::Parse(const v1::GenerateRequest& req) const {
  GenParams p;
  const Tokenizer* tok = engine_->model().tokenizer();
  switch (req.prompt_case()) {
    case v1::GenerateRequest::kText:
      if (tok == nullptr) return absl::FailedPreconditionError("the model has no tokenizer: send token_ids");
      p.prompt = tok->Encode(req.text());
      break;
    case v1::GenerateRequest::kTokenIds:
      p.prompt.assign(req.token_ids().ids().begin(), req.token_ids().ids().end());
      break;
    case v1::GenerateRequest::kChat: {
      if (tok == nullptr || !tok->has_chat_template()) return absl::FailedPreconditionError("the model has no chat template");
      std::vector<ChatMessage> msgs;
      for (const auto& m : req.chat().messages()) {
        if (m.role().empty()) return absl::InvalidArgumentError("a chat message has no role");
        msgs.push_back({m.role(), m.content()});
      }
      if (msgs.empty()) return absl::InvalidArgumentError("chat has no messages");
      std::string text = tok->ApplyChatTemplate(msgs);
      // Continuing a session: its system message is already in the cache.
      if (!req.session_id().empty()) {
        text.clear();
        for (const auto& m : msgs) text += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
        text += "<|im_start|>assistant\n";
      }
      p.prompt = tok->Encode(text);
      break;
    }
    default:
      return absl::InvalidArgumentError("the request has no prompt (text, token_ids or chat)");
  }
  if (p.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (req.max_tokens() < 0) return absl::InvalidArgumentError("max_tokens must be >= 0");
  p.max_tokens = req.max_tokens() == 0 ? 128 : req.max_tokens();
  if (!(req.temperature() >= 0.f) || req.temperature() > 100.f) return absl::InvalidArgumentError("temperature must be in [0, 100]");
  if (req.top_k() < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  if (!(req.top_p() >= 0.f) || req.top_p() > 1.f) return absl::InvalidArgumentError("top_p must be in [0, 1]");
  p.temperature = req.temperature();
  p.top_k = req.top_k();
  p.top_p = req.top_p();
  p.seed = req.seed();
  for (const auto& s : req.stop()) {
    if (s.empty()) return absl::InvalidArgumentError("empty stop string");
    p.stop.push_back(s);
  }
  kvq::Preset preset;
  if (!req.preset().empty() && !kvq::ParsePreset(req.preset(), &preset))
    return absl::InvalidArgumentError(absl::StrCat("unknown preset '", req.preset(), "' (fp16, kivi2, kivi4, innerq, innerq2, innerq_base)"));
  p.preset = req.preset();
  p.session = req.session_id();
  p.keep_session = req.keep_session();
  p.ignore_eos = req.ignore_eos();
  return p;
}

grpc::Status WorkerService::Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                                     grpc::ServerWriter<v1::GenerateResponse>* writer) {
  auto params = Parse(*req);
  if (!params.ok()) return ToGrpc(params.status());
  if (metrics_ != nullptr) metrics_->PromptTokens(int(params->prompt.size()));
  auto ch = std::make_shared<Channel>();
  const uint64_t handle = engine_->Submit(std::move(*params), [ch](const GenEvent& ev) {
    std::lock_guard<std::mutex> l(ch->mu);
    ch->events.push_back(ev);
    ch->cv.notify_all();
  });
  if (metrics_ != nullptr) metrics_->InFlight(engine_->in_flight());
  bool cancel_sent = false;
  grpc::Status result = grpc::Status::OK;
  for (;;) {
    GenEvent ev;
    {
      std::unique_lock<std::mutex> l(ch->mu);
      ch->cv.wait_for(l, std::chrono::milliseconds(20), [&] { return !ch->events.empty(); });
      if (ch->events.empty()) {
        if (ctx->IsCancelled() && !cancel_sent) {
          engine_->Cancel(handle);
          cancel_sent = true;
        }
        continue;
      }
      ev = std::move(ch->events.front());
      ch->events.pop_front();
    }
    if (ev.done && !ev.error.ok()) {
      result = ToGrpc(ev.error);
      break;
    }
    v1::GenerateResponse resp;
    resp.set_session_id(ev.session);
    if (ev.token >= 0) resp.add_token_ids(ev.token);
    resp.set_text(ev.text);
    if (ev.done) {
      resp.set_done(true);
      resp.set_finish_reason(ToProto(ev.finish));
      auto* u = resp.mutable_usage();
      u->set_prompt_tokens(ev.usage.prompt_tokens);
      u->set_completion_tokens(ev.usage.completion_tokens);
      u->set_session_length(ev.usage.session_length);
      u->set_time_to_first_token_s(ev.usage.ttft_s);
      u->set_total_time_s(ev.usage.total_s);
      u->set_kv_stored_bytes(ev.usage.kv_stored_bytes);
      u->set_kv_fp16_equivalent_bytes(ev.usage.kv_fp16_bytes);
      u->set_preset(ev.usage.preset);
    }
    if (!cancel_sent && !writer->Write(resp)) {  // the client went away
      engine_->Cancel(handle);
      cancel_sent = true;
    }
    if (ev.done) break;
  }
  if (metrics_ != nullptr) metrics_->InFlight(engine_->in_flight());
  if (cancel_sent && result.ok()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
  return result;
}

grpc::Status WorkerService::ModelInfo(grpc::ServerContext*, const v1::ModelInfoRequest*, v1::ModelInfoResponse* resp) {
  const ModelConfig& c = engine_->model().config();
  resp->set_name(c.name);
  resp->set_architecture(c.arch);
  resp->set_num_layers(c.num_layers);
  resp->set_num_q_heads(c.num_heads);
  resp->set_num_kv_heads(c.num_kv_heads);
  resp->set_head_dim(c.head_dim);
  resp->set_vocab_size(c.vocab_size);
  resp->set_context_length(c.context_length);
  resp->set_default_preset(engine_->options().default_preset);
  return grpc::Status::OK;
}

}  // namespace kvq::worker
