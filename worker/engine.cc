#include "worker/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kvq/format.h"

namespace kvq::worker {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Codes that a retry of the same step at the same position can cure.
bool Retryable(const absl::Status& st) {
  return absl::IsUnavailable(st) || absl::IsInternal(st) || absl::IsAborted(st) || absl::IsDeadlineExceeded(st) ||
         absl::IsUnknown(st);
}

}  // namespace

struct Engine::Seq {
  uint64_t handle = 0;
  GenParams p;
  std::function<void(const GenEvent&)> sink;
  std::string session;
  bool have_session = false;
  int32_t pos = 0;                 // tokens the cache holds
  std::vector<int32_t> to_feed;    // tokens not yet in the cache
  int32_t step_n = 0;              // tokens fed in the current step
  bool finishing = false;          // feeding the last token before ending (keep_session)
  Finish pending_finish = Finish::kNone;
  int generated = 0;
  std::string text;                // generated text so far (complete characters)
  size_t emitted = 0;              // bytes of `text` already sent
  Utf8Stream utf8;
  std::mt19937_64 rng;
  Clock::time_point start, last_token;
  bool got_first = false;
  double ttft = 0;
  int retries = 0;
};

Engine::Engine(Model* model, AttentionBackend* backend, EngineOptions options, EngineObserver observer)
    : model_(model), backend_(backend), stats_(dynamic_cast<SessionStats*>(backend)), opts_(std::move(options)),
      obs_(std::move(observer)) {
  opts_.max_batch = std::max(1, opts_.max_batch);
  opts_.prefill_chunk = std::max(1, opts_.prefill_chunk);
  opts_.max_step_tokens = std::max(opts_.max_batch, opts_.max_step_tokens);
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

uint64_t Engine::Submit(GenParams params, std::function<void(const GenEvent&)> sink) {
  auto s = std::make_unique<Seq>();
  s->p = std::move(params);
  s->sink = std::move(sink);
  s->start = Clock::now();
  std::lock_guard<std::mutex> l(mu_);
  s->handle = next_handle_++;
  const uint64_t h = s->handle;
  pending_.push_back(std::move(s));
  ++in_flight_;
  cv_.notify_all();
  return h;
}

void Engine::Cancel(uint64_t handle) {
  std::lock_guard<std::mutex> l(mu_);
  cancels_.push_back(handle);
  cv_.notify_all();
}

int Engine::in_flight() const {
  std::lock_guard<std::mutex> l(mu_);
  return in_flight_;
}

void Engine::Loop() {
  for (;;) {
    std::vector<std::unique_ptr<Seq>> fresh;
    std::vector<uint64_t> cancels;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !pending_.empty() || !active_.empty() || !cancels_.empty(); });
      if (stop_) break;
      cancels.swap(cancels_);
      // Cancelled before admission: end them here, without a session.
      for (auto it = pending_.begin(); it != pending_.end();) {
        if (std::find(cancels.begin(), cancels.end(), (*it)->handle) != cancels.end()) {
          fresh.push_back(std::move(*it));
          fresh.back()->pending_finish = Finish::kCancelled;
          it = pending_.erase(it);
        } else {
          ++it;
        }
      }
      while (!pending_.empty() && int(active_.size() + fresh.size()) < opts_.max_batch) {
        fresh.push_back(std::move(pending_.front()));
        pending_.pop_front();
      }
    }
    for (auto& s : active_)
      if (std::find(cancels.begin(), cancels.end(), s->handle) != cancels.end()) {
        Finalize(s.get(), Finish::kCancelled, absl::OkStatus());
        s.reset();
      }
    active_.erase(std::remove(active_.begin(), active_.end(), nullptr), active_.end());
    Admit(&fresh);
    if (!active_.empty()) Step();
  }
  // Shutting down: every request still here ends with an error.
  std::deque<std::unique_ptr<Seq>> left;
  {
    std::lock_guard<std::mutex> l(mu_);
    left.swap(pending_);
  }
  for (auto& s : active_) Finalize(s.get(), Finish::kNone, absl::UnavailableError("the worker is shutting down"));
  for (auto& s : left) Finalize(s.get(), Finish::kNone, absl::UnavailableError("the worker is shutting down"));
  active_.clear();
}

void Engine::Admit(std::vector<std::unique_ptr<Seq>>* fresh) {
  const ModelConfig& cfg = model_->config();
  for (auto& sp : *fresh) {
    Seq* s = sp.get();
    if (s->pending_finish == Finish::kCancelled) {
      Finalize(s, Finish::kCancelled, absl::OkStatus());
      continue;
    }
    if (s->p.prompt.empty()) {
      Finalize(s, Finish::kNone, absl::InvalidArgumentError("the prompt is empty"));
      continue;
    }
    for (int32_t t : s->p.prompt) {
      if (t < 0 || t >= cfg.vocab_size) {
        Finalize(s, Finish::kNone, absl::InvalidArgumentError(absl::StrCat("token id ", t, " is outside the vocabulary (", cfg.vocab_size, ")")));
        s = nullptr;
        break;
      }
    }
    if (s == nullptr) continue;
    if (s->p.session.empty()) {
      if (s->p.preset.empty()) s->p.preset = opts_.default_preset;
      kvq::Preset preset;
      if (!kvq::ParsePreset(s->p.preset, &preset)) {
        Finalize(s, Finish::kNone, absl::InvalidArgumentError(absl::StrCat("unknown preset '", s->p.preset, "'")));
        continue;
      }
      auto id = backend_->CreateSession(cfg.session_shape(), s->p.preset);
      if (!id.ok()) {
        Finalize(s, Finish::kNone, id.status());
        continue;
      }
      s->session = *id;
      s->pos = 0;
    } else {
      auto len = backend_->SessionLength(s->p.session);
      if (!len.ok()) {
        Finalize(s, Finish::kNone, len.status());
        continue;
      }
      s->session = s->p.session;
      s->pos = *len;
    }
    s->have_session = true;
    if (s->pos + int32_t(s->p.prompt.size()) >= cfg.context_length) {
      Finalize(s, Finish::kNone, absl::OutOfRangeError(absl::StrCat("the prompt (", s->p.prompt.size(), " tokens after ", s->pos,
                                                                    ") does not fit the context length ", cfg.context_length)));
      continue;
    }
    s->to_feed = s->p.prompt;
    s->rng.seed(s->p.seed != 0 ? s->p.seed : std::random_device{}());
    GenEvent ev;
    ev.session = s->session;
    s->sink(ev);
    active_.push_back(std::move(sp));
  }
  fresh->clear();
}

void Engine::Step() {
  const ModelConfig& cfg = model_->config();
  // Plan: decoding sequences first (one token each), then prompt chunks in arrival order.
  std::vector<Seq*> order;
  for (auto& s : active_) if (s->to_feed.size() == 1) order.push_back(s.get());
  for (auto& s : active_) if (s->to_feed.size() > 1) order.push_back(s.get());
  int budget = opts_.max_step_tokens;
  std::vector<SeqChunk> chunks;
  std::vector<Seq*> in_step;
  for (Seq* s : order) {
    const int n = std::min({int(s->to_feed.size()), opts_.prefill_chunk, budget});
    if (n <= 0) continue;
    budget -= n;
    s->step_n = n;
    SeqChunk c;
    c.session = s->session;
    c.position = s->pos;
    c.tokens.assign(s->to_feed.begin(), s->to_feed.begin() + n);
    c.want_logits = !s->finishing && n == int(s->to_feed.size());
    chunks.push_back(std::move(c));
    in_step.push_back(s);
  }
  if (chunks.empty()) return;
  std::vector<float> logits;
  const auto t0 = Clock::now();
  const absl::Status st = model_->Forward(chunks, backend_, &logits);
  const auto t1 = Clock::now();
  int rows = 0;
  for (const auto& c : chunks) rows += int(c.tokens.size());
  if (obs_.step) obs_.step(int(chunks.size()), rows, Seconds(t0, t1));
  std::vector<std::pair<std::string, absl::Status>> failed = backend_->TakeFailed();
  auto failure_of = [&](const Seq* s) -> absl::Status {
    if (!st.ok()) return st;
    for (const auto& [id, fst] : failed)
      if (id == s->session) return fst;
    return absl::OkStatus();
  };
  size_t li = 0;  // index into logits rows
  for (size_t i = 0; i < in_step.size(); ++i) {
    Seq* s = in_step[i];
    const bool had_logits = chunks[i].want_logits;
    const absl::Status fst = failure_of(s);
    if (had_logits && st.ok()) ++li;
    if (!fst.ok()) {
      // The step did not complete for this sequence: retry it at the same position (the store
      // truncates layers that advanced), or give up.
      if (!Retryable(fst) || ++s->retries > opts_.max_retries) {
        Finalize(s, Finish::kNone, fst);
        for (auto& a : active_) if (a.get() == s) a.reset();
      }
      continue;
    }
    s->retries = 0;
    s->pos += s->step_n;
    s->to_feed.erase(s->to_feed.begin(), s->to_feed.begin() + s->step_n);
    if (s->finishing) {
      Finalize(s, s->pending_finish, absl::OkStatus());
      for (auto& a : active_) if (a.get() == s) a.reset();
      continue;
    }
    if (!had_logits) continue;  // more prompt to feed
    const int32_t tok = Sample(s, logits.data() + (li - 1) * size_t(cfg.vocab_size));
    const auto now = Clock::now();
    if (!s->got_first) {
      s->got_first = true;
      s->ttft = Seconds(s->start, now);
      if (obs_.time_to_first_token) obs_.time_to_first_token(s->ttft);
    } else if (obs_.inter_token) {
      obs_.inter_token(Seconds(s->last_token, now));
    }
    s->last_token = now;
    ++s->generated;
    Finish finish = Finish::kNone;
    const Tokenizer* tk = model_->tokenizer();
    const bool is_stop_id = tk != nullptr && !s->p.ignore_eos &&
                            std::find(tk->stop_ids().begin(), tk->stop_ids().end(), tok) != tk->stop_ids().end();
    GenEvent ev;
    ev.token = tok;
    if (is_stop_id) {
      finish = Finish::kStop;
    } else if (tk != nullptr) {
      s->text += s->utf8.Push(tk->TokenBytes(tok));
    }
    // Stop strings.
    for (const auto& stop : s->p.stop) {
      if (stop.empty()) continue;
      const size_t from = s->emitted > stop.size() ? s->emitted - stop.size() : 0;
      const size_t at = s->text.find(stop, from);
      if (at != std::string::npos) {
        s->text.resize(at);
        (void)s->utf8.Flush();  // bytes after the stop string are dropped with it
        finish = Finish::kStop;
      }
    }
    if (finish == Finish::kNone && s->generated >= s->p.max_tokens) finish = Finish::kLength;
    if (finish == Finish::kNone && s->pos + 1 >= cfg.context_length) finish = Finish::kContext;
    ev.text = SafeText(s, finish != Finish::kNone);
    s->sink(ev);
    if (finish == Finish::kNone) {
      s->to_feed = {tok};
    } else if (s->p.keep_session && finish != Finish::kContext) {
      // Feed the last token too, so a continuation starts right after it.
      s->to_feed = {tok};
      s->finishing = true;
      s->pending_finish = finish;
    } else {
      Finalize(s, finish, absl::OkStatus());
      for (auto& a : active_) if (a.get() == s) a.reset();
    }
  }
  active_.erase(std::remove(active_.begin(), active_.end(), nullptr), active_.end());
}

std::string Engine::SafeText(Seq* s, bool final) {
  size_t end = s->text.size();
  if (final) {
    s->text += s->utf8.Flush();
    end = s->text.size();
  } else {
    // Hold back a tail that could still become a stop string.
    for (const auto& stop : s->p.stop) {
      for (size_t k = std::min(stop.size() - (stop.empty() ? 0 : 1), s->text.size()); k > 0; --k) {
        if (s->text.compare(s->text.size() - k, k, stop, 0, k) == 0) {
          end = std::min(end, s->text.size() - k);
          break;
        }
      }
    }
  }
  if (end <= s->emitted) return "";
  std::string out = s->text.substr(s->emitted, end - s->emitted);
  s->emitted = end;
  return out;
}

int32_t Engine::Sample(Seq* s, const float* logits) {
  const int V = model_->config().vocab_size;
  if (s->p.temperature <= 0.f) {
    return int32_t(std::max_element(logits, logits + V) - logits);
  }
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  int k = V;
  if (s->p.top_k > 0 && s->p.top_k < V) {
    k = s->p.top_k;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  } else {
    std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  }
  const float inv_t = 1.0f / s->p.temperature;
  std::vector<double> prob(static_cast<size_t>(k));
  const double mx = double(logits[idx[0]]) * inv_t;
  double sum = 0;
  for (int i = 0; i < k; ++i) sum += (prob[size_t(i)] = std::exp(double(logits[idx[size_t(i)]]) * inv_t - mx));
  int keep = k;
  if (s->p.top_p > 0.f && s->p.top_p < 1.f) {
    double c = 0;
    for (int i = 0; i < k; ++i) {
      c += prob[size_t(i)] / sum;
      if (c >= double(s->p.top_p)) {
        keep = i + 1;
        break;
      }
    }
  }
  double total = 0;
  for (int i = 0; i < keep; ++i) total += prob[size_t(i)];
  std::uniform_real_distribution<double> u(0.0, total);
  double r = u(s->rng);
  for (int i = 0; i < keep; ++i) {
    r -= prob[size_t(i)];
    if (r <= 0) return idx[size_t(i)];
  }
  return idx[size_t(keep - 1)];
}

void Engine::Finalize(Seq* s, Finish finish, absl::Status error) {
  GenEvent ev;
  ev.session = s->session;
  ev.done = true;
  ev.finish = finish;
  ev.error = error;
  ev.usage.prompt_tokens = int(s->p.prompt.size());
  ev.usage.completion_tokens = s->generated;
  ev.usage.session_length = s->pos;
  ev.usage.ttft_s = s->ttft;
  ev.usage.total_s = Seconds(s->start, Clock::now());
  ev.usage.preset = s->p.preset;
  if (s->have_session) {
    if (stats_ != nullptr) {
      int32_t len = 0;
      if (stats_->SessionBytes(s->session, &ev.usage.kv_stored_bytes, &ev.usage.kv_fp16_bytes, &len).ok())
        ev.usage.session_length = len;
    }
    if (!s->p.keep_session) (void)backend_->DeleteSession(s->session);
  }
  if (error.ok() && finish != Finish::kCancelled && s->text.size() > s->emitted) ev.text = SafeText(s, true);
  {
    std::lock_guard<std::mutex> l(mu_);
    --in_flight_;  // before the sink: whoever sees the last event sees the count without it
  }
  if (obs_.request_done) obs_.request_done(finish, !error.ok());
  s->sink(ev);
}

}  // namespace kvq::worker
