// Random-weight Llama-shaped GGUF models (tiny ones for tests; real shapes for performance work)
// with a small byte-level BPE vocabulary: 3 special tokens (<|endoftext|>, <|im_start|>,
// <|im_end|>), the 256 byte tokens and merges built from a fixed word list.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "worker/gguf.h"

namespace kvq::worker {

struct RandomModelSpec {
  int num_layers = 2;
  int d_model = 128;
  int num_heads = 4;
  int num_kv_heads = 2;
  int d_ff = 256;
  int vocab_extra = 0;        // extra (never produced by merges) tokens after the tiny vocabulary
  int context_length = 4096;
  float rope_theta = 10000.f;
  GgmlType weight_type = GgmlType::kQ8_0;
  bool tied_embeddings = true;
  uint64_t seed = 1;
  std::string name = "random-llama";
};

// Fills `w` with the metadata and tensors of a random model (weights ~ N(0, 1/sqrt(fan_in))).
absl::Status WriteRandomModel(const RandomModelSpec& spec, GgufWriter* w);
// The tiny tokenizer alone (tokens, token types, merges, special ids, ChatML template).
void WriteTinyTokenizer(GgufWriter* w, int vocab_extra);
int TinyVocabSize(int vocab_extra);

}  // namespace kvq::worker
