// The generation engine: continuous batching over one model and one attention backend.
//
// One scheduler thread runs forward steps. Every step batches all active sequences (one
// Attend call per layer for the whole batch): decoding sequences contribute one token, new ones
// a chunk of their prompt (chunked prefill, bounded by a per-step token budget so a long prompt
// never stalls the others). New requests join at step boundaries; cancelled ones leave there.
// A step whose attention failed for some sequences is retried for them at the same position,
// which the store repairs by truncating the layers that did advance (positions make it safe).
// The backend is used from the scheduler thread only.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "worker/attention.h"
#include "worker/model.h"

namespace kvq::worker {

enum class Finish { kNone = 0, kLength = 1, kStop = 2, kCancelled = 3, kContext = 4 };

struct GenParams {
  std::vector<int32_t> prompt;     // tokenized prompt (non-empty)
  int max_tokens = 128;
  float temperature = 0.f;
  int top_k = 0;
  float top_p = 0.f;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  std::string session;             // continue this session (empty: create one)
  std::string preset;              // for a new session (empty: the engine's default)
  bool keep_session = false;
  bool ignore_eos = false;
};

struct GenUsage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
  int session_length = 0;
  double ttft_s = 0;
  double total_s = 0;
  int64_t kv_stored_bytes = 0;
  int64_t kv_fp16_bytes = 0;
  std::string preset;
};

// What a request's stream receives, in order: a first event with the session id, one per
// token, and a last one with done (finish, usage) or an error.
struct GenEvent {
  std::string session;
  int32_t token = -1;
  std::string text;
  bool done = false;
  Finish finish = Finish::kNone;
  GenUsage usage;
  absl::Status error;
};

// Optional hooks for metrics (called on the scheduler thread).
struct EngineObserver {
  std::function<void(double seconds)> time_to_first_token;
  std::function<void(double seconds)> inter_token;
  std::function<void(int batch_seqs, int batch_tokens, double seconds)> step;
  std::function<void(Finish finish, bool error)> request_done;
};

// Extra session facts a backend may know (bytes held); the store client implements it.
class SessionStats {
 public:
  virtual ~SessionStats() = default;
  virtual absl::Status SessionBytes(const std::string& session, int64_t* stored, int64_t* fp16_equivalent,
                                    int32_t* length) = 0;
};

struct EngineOptions {
  int max_batch = 16;            // sequences per step
  int max_step_tokens = 256;     // token rows per step (prefill chunks share what decoding leaves)
  int prefill_chunk = 128;       // at most this many prompt tokens of one sequence per step
  std::string default_preset = "kivi2";
  int max_retries = 3;           // retries of a failed step for a sequence before it fails
};

class Engine {
 public:
  Engine(Model* model, AttentionBackend* backend, EngineOptions options, EngineObserver observer = {});
  ~Engine();  // stops the scheduler; pending requests end with an error

  // Queues a request; events go to `sink` (called from the scheduler thread, must not block
  // for long). Returns a handle for Cancel.
  uint64_t Submit(GenParams params, std::function<void(const GenEvent&)> sink);
  // Ends the request at the next step boundary (finish kCancelled; the session is kept only if
  // keep_session was set).
  void Cancel(uint64_t handle);
  int in_flight() const;
  const Model& model() const { return *model_; }
  const EngineOptions& options() const { return opts_; }

 private:
  struct Seq;
  void Loop();
  void Admit(std::vector<std::unique_ptr<Seq>>* fresh);
  void Step();
  void Finalize(Seq* s, Finish finish, absl::Status error);
  int32_t Sample(Seq* s, const float* logits);
  std::string SafeText(Seq* s, bool final);

  Model* model_;
  AttentionBackend* backend_;
  SessionStats* stats_;  // backend_ as SessionStats, or null
  EngineOptions opts_;
  EngineObserver obs_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Seq>> pending_;
  std::vector<uint64_t> cancels_;
  bool stop_ = false;
  uint64_t next_handle_ = 1;
  int in_flight_ = 0;

  std::vector<std::unique_ptr<Seq>> active_;  // scheduler thread only
  std::thread thread_;
};

}  // namespace kvq::worker
