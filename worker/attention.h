// The attention interface between the transformer (which runs everything else) and where the KV
// cache lives. Per layer, for a batch of sequences, the worker hands over q/k/v after RoPE and
// gets o back; the backend appends k/v to each session's cache.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvq::worker {

// The model shape a session is created with.
struct SessionShape {
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
};

// One sequence's rows in a layer call: n new tokens starting at absolute position `position`.
// Rows of q/k/v/o are the concatenation of every sequence's rows in batch order.
struct AttendSeq {
  std::string session;
  int32_t position = 0;
  int32_t n = 0;
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  // Creates a session with a quantization preset ("fp16", "kivi2", ...); returns its id.
  virtual absl::StatusOr<std::string> CreateSession(const SessionShape& shape, const std::string& preset) = 0;
  virtual absl::Status DeleteSession(const std::string& session) = 0;
  // Where the session's next step starts: the smallest length over its layers. After a step that
  // failed half-way some layers are longer; the next step at this position truncates them back.
  virtual absl::StatusOr<int32_t> SessionLength(const std::string& session) = 0;
  // Starts / ends one forward step (all layers). Stream-based backends keep one stream per step.
  virtual absl::Status BeginStep() { return absl::OkStatus(); }
  virtual absl::Status EndStep() { return absl::OkStatus(); }
  // q [rows, Hq, D], k/v [rows, Hkv, D] (post-RoPE, float) -> o [rows, Hq, D].
  virtual absl::Status Attend(int layer, const std::vector<AttendSeq>& seqs, const std::vector<float>& q,
                              const std::vector<float>& k, const std::vector<float>& v, std::vector<float>* o) = 0;
  // Sequences whose entries failed since BeginStep (their o rows are zeros and they were left
  // out of the step's later layers), with the reason. Other sequences of the step are fine.
  virtual std::vector<std::pair<std::string, absl::Status>> TakeFailed() { return {}; }
};

}  // namespace kvq::worker
