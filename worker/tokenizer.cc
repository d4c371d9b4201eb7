#include "worker/tokenizer.h"

#include <algorithm>
#include <climits>
#include <queue>

#include "absl/strings/str_cat.h"

namespace kvq::worker {
namespace {

#include "worker/unicode_tables.inc"

template <size_t N>
bool InRanges(const uint32_t (&r)[N][2], uint32_t cp) {
  size_t lo = 0, hi = N;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (cp < r[mid][0]) hi = mid;
    else if (cp > r[mid][1]) lo = mid + 1;
    else return true;
  }
  return false;
}
bool IsLetter(uint32_t cp) {
  if (cp < 128) return (cp | 32) >= 'a' && (cp | 32) <= 'z';
  return InRanges(kLetterRanges, cp);
}
bool IsNumber(uint32_t cp) {
  if (cp < 128) return cp >= '0' && cp <= '9';
  return InRanges(kNumberRanges, cp);
}
bool IsSpace(uint32_t cp) { return InRanges(kSpaceRanges, cp); }

// Decodes UTF-8 into code points with their byte offsets; invalid bytes become U+FFFD-like
// single-byte code points (kept as one "other" character so no byte is lost).
void DecodeUtf8(const std::string& s, std::vector<uint32_t>* cps, std::vector<size_t>* offs) {
  size_t i = 0;
  while (i < s.size()) {
    const uint8_t c = uint8_t(s[i]);
    uint32_t cp = 0;
    int len = 1;
    if (c < 0x80) { cp = c; }
    else if ((c >> 5) == 6) { cp = c & 0x1f; len = 2; }
    else if ((c >> 4) == 14) { cp = c & 0x0f; len = 3; }
    else if ((c >> 3) == 30) { cp = c & 0x07; len = 4; }
    else { cp = 0xFFFD; len = 1; }
    bool ok = len == 1 || i + size_t(len) <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const uint8_t cc = uint8_t(s[i + size_t(k)]);
      if ((cc >> 6) != 2) ok = false;
      else cp = (cp << 6) | (cc & 0x3f);
    }
    if (!ok) { cp = 0xFFFD; len = 1; }
    cps->push_back(cp);
    offs->push_back(i);
    i += size_t(len);
  }
  offs->push_back(s.size());
}

std::string EncodeUtf8(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3f));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  }
  return out;
}

// GPT-2's byte <-> unicode map: printable bytes map to themselves, the rest to U+0100 onward.
struct ByteMap {
  std::string byte_to_str[256];
  std::unordered_map<uint32_t, uint8_t> cp_to_byte;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + n++);
      byte_to_str[b] = EncodeUtf8(cp);
      cp_to_byte[cp] = uint8_t(b);
    }
  }
};
const ByteMap& Bytes() {
  static const ByteMap* m = new ByteMap();
  return *m;
}

}  // namespace

absl::StatusOr<Tokenizer> Tokenizer::FromParts(std::vector<std::string> tokens, std::vector<int> token_types,
                                               const std::vector<std::string>& merges, bool digits_individually) {
  if (tokens.empty()) return absl::InvalidArgumentError("tokenizer has an empty vocabulary");
  if (!token_types.empty() && token_types.size() != tokens.size())
    return absl::InvalidArgumentError("tokenizer token_type and tokens differ in length");
  Tokenizer t;
  t.digits_individually_ = digits_individually;
  const ByteMap& bm = Bytes();
  t.special_.assign(tokens.size(), 0);
  t.token_bytes_.resize(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int type = token_types.empty() ? 1 : token_types[i];
    const bool special = type == 3 || type == 4;
    t.special_[i] = special;
    t.vocab_.emplace(tokens[i], int32_t(i));
    if (special) {
      t.token_bytes_[i] = tokens[i];
      if (!tokens[i].empty()) t.specials_.emplace_back(tokens[i], int32_t(i));
      continue;
    }
    std::vector<uint32_t> cps;
    std::vector<size_t> offs;
    DecodeUtf8(tokens[i], &cps, &offs);
    std::string raw;
    for (uint32_t cp : cps) {
      auto it = bm.cp_to_byte.find(cp);
      if (it != bm.cp_to_byte.end()) raw += char(it->second);
      else raw += EncodeUtf8(cp);  // not byte-mapped: keep the text
    }
    t.token_bytes_[i] = std::move(raw);
  }
  std::sort(t.specials_.begin(), t.specials_.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  for (size_t r = 0; r < merges.size(); ++r) t.merge_rank_.emplace(merges[r], int32_t(r));
  t.tokens_ = std::move(tokens);
  return t;
}

absl::StatusOr<Tokenizer> Tokenizer::FromSpmParts(std::vector<std::string> tokens, std::vector<float> scores,
                                                  std::vector<int> token_types, bool add_space_prefix) {
  if (tokens.empty()) return absl::InvalidArgumentError("tokenizer has an empty vocabulary");
  if (!scores.empty() && scores.size() != tokens.size())
    return absl::InvalidArgumentError("tokenizer scores and tokens differ in length");
  if (!token_types.empty() && token_types.size() != tokens.size())
    return absl::InvalidArgumentError("tokenizer token_type and tokens differ in length");
  Tokenizer t;
  t.spm_ = true;
  t.add_space_prefix_ = add_space_prefix;
  t.scores_ = scores.empty() ? std::vector<float>(tokens.size(), 0.f) : std::move(scores);
  std::fill(std::begin(t.byte_tokens_), std::end(t.byte_tokens_), -1);
  t.special_.assign(tokens.size(), 0);
  t.token_bytes_.resize(tokens.size());
  static const std::string kSpace = "\xe2\x96\x81";  // U+2581
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int type = token_types.empty() ? 1 : token_types[i];
    t.vocab_.emplace(tokens[i], int32_t(i));
    if (type == 3 || type == 4) {  // control / user-defined: matched in the text, decoded as is
      t.special_[i] = 1;
      t.token_bytes_[i] = type == 4 ? tokens[i] : "";
      if (type == 4 && !tokens[i].empty()) t.specials_.emplace_back(tokens[i], int32_t(i));
      if (type == 3 && tokens[i].size() > 2 && tokens[i][0] == '<') t.specials_.emplace_back(tokens[i], int32_t(i));
      continue;
    }
    if (type == 6 && tokens[i].size() == 6 && tokens[i].compare(0, 3, "<0x") == 0) {  // <0xAB>
      const int b = std::stoi(tokens[i].substr(3, 2), nullptr, 16);
      t.byte_tokens_[b] = int32_t(i);
      t.token_bytes_[i] = std::string(1, char(b));
      continue;
    }
    std::string text = tokens[i];
    for (size_t at = text.find(kSpace); at != std::string::npos; at = text.find(kSpace, at + 1)) text.replace(at, 3, " ");
    t.token_bytes_[i] = text;
  }
  std::sort(t.specials_.begin(), t.specials_.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  t.tokens_ = std::move(tokens);
  return t;
}

// SentencePiece BPE as llama.cpp runs it: start from UTF-8 characters, repeatedly merge the
// adjacent pair whose concatenation is the highest-scoring token (leftmost on ties).
void Tokenizer::Spm(const std::string& raw, std::vector<int32_t>* out) const {
  std::string text;
  for (char c : raw) {
    if (c == ' ') text += "\xe2\x96\x81";
    else text += c;
  }
  struct Sym { size_t off, len; int prev, next; };
  std::vector<Sym> syms;
  std::vector<uint32_t> cps;
  std::vector<size_t> offs;
  DecodeUtf8(text, &cps, &offs);
  for (size_t i = 0; i < cps.size(); ++i)
    syms.push_back({offs[i], offs[i + 1] - offs[i], int(i) - 1, i + 1 < cps.size() ? int(i) + 1 : -1});
  struct Bigram { float score; int left; size_t len; };
  auto cmp = [](const Bigram& a, const Bigram& b) { return a.score < b.score || (a.score == b.score && a.left > b.left); };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(cmp)> q(cmp);
  auto try_add = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    const std::string s = text.substr(syms[size_t(l)].off, syms[size_t(l)].len + syms[size_t(r)].len);
    auto it = vocab_.find(s);
    if (it == vocab_.end()) return;
    q.push({scores_[size_t(it->second)], l, s.size()});
  };
  for (size_t i = 1; i < syms.size(); ++i) try_add(int(i) - 1, int(i));
  while (!q.empty()) {
    const Bigram b = q.top();
    q.pop();
    Sym& l = syms[size_t(b.left)];
    if (l.len == 0 || l.next < 0) continue;
    Sym& r = syms[size_t(l.next)];
    if (l.len + r.len != b.len) continue;  // stale: one side merged since
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) syms[size_t(r.next)].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }
  for (int i = syms.empty() ? -1 : 0; i >= 0; i = syms[size_t(i)].next) {
    const std::string s = text.substr(syms[size_t(i)].off, syms[size_t(i)].len);
    auto it = vocab_.find(s);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      continue;
    }
    for (unsigned char c : s)  // byte fallback
      if (byte_tokens_[c] >= 0) out->push_back(byte_tokens_[c]);
  }
}

absl::StatusOr<Tokenizer> Tokenizer::FromGguf(const GgufFile& file) {
  auto model = file.GetString("tokenizer.ggml.model");
  if (!model.ok()) return absl::InvalidArgumentError("GGUF file has no tokenizer (tokenizer.ggml.model)");
  if (*model == "llama") {
    const GgufValue* toks = file.Find("tokenizer.ggml.tokens");
    const GgufValue* sc = file.Find("tokenizer.ggml.scores");
    if (toks == nullptr || toks->strings.empty()) return absl::InvalidArgumentError("GGUF file has no tokenizer.ggml.tokens");
    std::vector<float> scores;
    if (sc != nullptr) for (double d : sc->numbers) scores.push_back(float(d));
    std::vector<int> types;
    if (const GgufValue* tt = file.Find("tokenizer.ggml.token_type")) for (double d : tt->numbers) types.push_back(int(d));
    auto t = FromSpmParts(toks->strings, scores, types, file.NumberOr("tokenizer.ggml.add_space_prefix", 1) != 0);
    if (!t.ok()) return t.status();
    t->bos_ = int32_t(file.NumberOr("tokenizer.ggml.bos_token_id", -1));
    t->eos_ = int32_t(file.NumberOr("tokenizer.ggml.eos_token_id", -1));
    if (t->eos_ >= 0) t->stop_ids_.push_back(t->eos_);
    return t;
  }
  if (*model != "gpt2")
    return absl::UnimplementedError(absl::StrCat("tokenizer model '", *model, "' is not supported (gpt2 byte-level BPE, llama SentencePiece)"));
  const GgufValue* toks = file.Find("tokenizer.ggml.tokens");
  const GgufValue* merges = file.Find("tokenizer.ggml.merges");
  if (toks == nullptr || toks->strings.empty()) return absl::InvalidArgumentError("GGUF file has no tokenizer.ggml.tokens");
  if (merges == nullptr) return absl::InvalidArgumentError("GGUF file has no tokenizer.ggml.merges");
  std::vector<int> types;
  if (const GgufValue* tt = file.Find("tokenizer.ggml.token_type")) {
    for (double d : tt->numbers) types.push_back(int(d));
  }
  std::string pre = "default";
  if (auto p = file.GetString("tokenizer.ggml.pre"); p.ok()) pre = *p;
  // Pre-tokenizers that split digits one by one before the GPT-2 pattern (llama.cpp's list).
  const bool digits = pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "command-r" ||
                      pre == "codeshell" || pre == "exaone" || pre == "minerva-7b";
  auto t = FromParts(toks->strings, types, merges->strings, digits);
  if (!t.ok()) return t.status();
  t->bos_ = int32_t(file.NumberOr("tokenizer.ggml.bos_token_id", -1));
  t->eos_ = int32_t(file.NumberOr("tokenizer.ggml.eos_token_id", -1));
  if (t->eos_ >= 0) t->stop_ids_.push_back(t->eos_);
  if (auto tpl = file.GetString("tokenizer.chat_template"); tpl.ok()) {
    const std::string kSys = "<|im_start|>system\n";
    if (tpl->find("<|im_start|>") != std::string::npos) {
      t->chatml_ = true;
      const size_t a = tpl->find(kSys);
      if (a != std::string::npos) {
        const size_t b = tpl->find("<|im_end|>", a);
        if (b != std::string::npos) t->default_system_ = tpl->substr(a + kSys.size(), b - a - kSys.size());
      }
    }
  }
  const int32_t im_end = t->TokenId("<|im_end|>");
  if (im_end >= 0 && im_end != t->eos_) t->stop_ids_.push_back(im_end);
  return t;
}

int32_t Tokenizer::TokenId(const std::string& token_text) const {
  auto it = vocab_.find(token_text);
  return it == vocab_.end() ? -1 : it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const { return id >= 0 && id < vocab_size() && special_[size_t(id)]; }

std::string Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return token_bytes_[size_t(id)];
}

// The GPT-2 pattern 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+,
// after an optional split of every number character into its own piece.
void Tokenizer::SplitWords(const std::string& text, std::vector<std::string>* words) const {
  std::vector<uint32_t> cps;
  std::vector<size_t> offs;
  DecodeUtf8(text, &cps, &offs);
  const size_t n = cps.size();
  auto emit = [&](size_t a, size_t b) { words->push_back(text.substr(offs[a], offs[b] - offs[a])); };
  // Segment boundaries from the digit splitter: the pattern runs inside each segment.
  size_t seg_start = 0;
  while (seg_start < n) {
    size_t seg_end = seg_start;
    if (digits_individually_ && IsNumber(cps[seg_start])) {
      seg_end = seg_start + 1;
    } else {
      while (seg_end < n && !(digits_individually_ && IsNumber(cps[seg_end]))) ++seg_end;
    }
    size_t i = seg_start;
    while (i < seg_end) {
      const uint32_t c = cps[i];
      // contractions
      if (c == '\'' && i + 1 < seg_end) {
        const uint32_t a = cps[i + 1];
        if (a == 's' || a == 't' || a == 'm' || a == 'd') { emit(i, i + 2); i += 2; continue; }
        if (i + 2 < seg_end) {
          const uint32_t b = cps[i + 2];
          if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) { emit(i, i + 3); i += 3; continue; }
        }
      }
      size_t j = i + (c == ' ' ? 1 : 0);
      if (j < seg_end) {
        const uint32_t d = cps[j];
        size_t k = j;
        if (IsLetter(d)) {
          while (k < seg_end && IsLetter(cps[k])) ++k;
        } else if (IsNumber(d)) {
          while (k < seg_end && IsNumber(cps[k])) ++k;
        } else if (!IsSpace(d)) {
          while (k < seg_end && !IsSpace(cps[k]) && !IsLetter(cps[k]) && !IsNumber(cps[k])) ++k;
        }
        if (k > j) { emit(i, k); i = k; continue; }
      }
      // whitespace
      size_t k = i;
      while (k < seg_end && IsSpace(cps[k])) ++k;
      if (k == i) { emit(i, i + 1); ++i; continue; }  // cannot happen: every char is L, N, space or other
      if (k < seg_end && k - i > 1) k -= 1;  // \s+(?!\S): leave the last space to the next word
      emit(i, k);
      i = k;
    }
    seg_start = seg_end;
  }
}

void Tokenizer::Bpe(const std::string& word, std::vector<int32_t>* out) const {
  const ByteMap& bm = Bytes();
  std::vector<std::string> parts;
  parts.reserve(word.size());
  for (unsigned char b : word) parts.push_back(bm.byte_to_str[b]);
  while (parts.size() > 1) {
    int best = INT_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      auto it = merge_rank_.find(parts[i] + " " + parts[i + 1]);
      if (it != merge_rank_.end() && it->second < best) { best = it->second; at = i; }
    }
    if (best == INT_MAX) break;
    // Merge every occurrence of the best pair, left to right.
    const std::string a = parts[at], b = parts[at + 1];
    std::vector<std::string> next;
    next.reserve(parts.size());
    for (size_t i = 0; i < parts.size(); ++i) {
      if (i + 1 < parts.size() && parts[i] == a && parts[i + 1] == b) {
        next.push_back(a + b);
        ++i;
      } else {
        next.push_back(parts[i]);
      }
    }
    parts.swap(next);
  }
  for (const auto& p : parts) {
    auto it = vocab_.find(p);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      continue;
    }
    // Not in the vocabulary (an incomplete merge table): fall back to single byte tokens.
    std::vector<uint32_t> cps;
    std::vector<size_t> offs;
    DecodeUtf8(p, &cps, &offs);
    for (size_t i = 0; i < cps.size(); ++i) {
      auto jt = vocab_.find(p.substr(offs[i], offs[i + 1] - offs[i]));
      if (jt != vocab_.end()) out->push_back(jt->second);
    }
  }
}

std::vector<int32_t> Tokenizer::Encode(const std::string& text, bool parse_special) const {
  std::vector<int32_t> ids;
  std::vector<std::string> words;
  std::unordered_map<std::string, std::vector<int32_t>> cache;
  bool first_plain = true;
  auto encode_plain = [&](const std::string& s) {
    if (spm_) {
      Spm(add_space_prefix_ && first_plain ? " " + s : s, &ids);
      first_plain = false;
      return;
    }
    words.clear();
    SplitWords(s, &words);
    for (const auto& w : words) {
      auto it = cache.find(w);
      if (it == cache.end()) {
        std::vector<int32_t> v;
        Bpe(w, &v);
        it = cache.emplace(w, std::move(v)).first;
      }
      ids.insert(ids.end(), it->second.begin(), it->second.end());
    }
  };
  size_t start = 0, i = 0;
  while (parse_special && i < text.size()) {
    bool hit = false;
    if (text[i] == '<' || !specials_.empty()) {
      for (const auto& [s, id] : specials_) {
        if (text.compare(i, s.size(), s) == 0) {
          if (i > start) encode_plain(text.substr(start, i - start));
          ids.push_back(id);
          i += s.size();
          start = i;
          hit = true;
          break;
        }
      }
    }
    if (!hit) ++i;
  }
  if (start < text.size()) encode_plain(text.substr(start));
  return ids;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (skip_special && IsSpecial(id)) continue;
    out += TokenBytes(id);
  }
  if (spm_ && add_space_prefix_ && !out.empty() && out[0] == ' ') out.erase(0, 1);  // the added prefix
  return out;
}

std::string Tokenizer::ApplyChatTemplate(const std::vector<ChatMessage>& messages) const {
  std::string out;
  if (!default_system_.empty() && (messages.empty() || messages[0].role != "system"))
    out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
  for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  out += "<|im_start|>assistant\n";
  return out;
}

namespace {
// Copies valid UTF-8 sequences and replaces each invalid byte with U+FFFD, so the text is
// always valid UTF-8 (protobuf strings require it).
std::string Sanitize(const std::string& in) {
  std::string out;
  size_t i = 0;
  while (i < in.size()) {
    const uint8_t c = uint8_t(in[i]);
    int len = 0;
    uint32_t min = 0;
    if (c < 0x80) len = 1;
    else if (c >= 0xC2 && c <= 0xDF) { len = 2; min = 0x80; }
    else if ((c >> 4) == 0xE) { len = 3; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; min = 0x10000; }
    bool ok = len > 0 && i + size_t(len) <= in.size();
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
    for (int k = 1; ok && k < len; ++k) {
      const uint8_t cc = uint8_t(in[i + size_t(k)]);
      if ((cc >> 6) != 2) ok = false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if (ok && len > 1 && (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) ok = false;
    if (ok) {
      out.append(in, i, size_t(len));
      i += size_t(len);
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}
}  // namespace

std::string Utf8Stream::Push(const std::string& bytes) {
  pending_ += bytes;
  // Hold back the bytes of a character that the next token may complete.
  size_t cut = pending_.size();
  for (size_t back = 1; back <= 3 && back <= pending_.size(); ++back) {
    const uint8_t c = uint8_t(pending_[pending_.size() - back]);
    if ((c >> 6) == 2) continue;  // continuation byte
    int len = 1;
    if ((c >> 5) == 6) len = 2;
    else if ((c >> 4) == 14) len = 3;
    else if ((c >> 3) == 30) len = 4;
    if (size_t(len) > back) cut = pending_.size() - back;
    break;
  }
  std::string out = Sanitize(pending_.substr(0, cut));
  pending_.erase(0, cut);
  return out;
}

std::string Utf8Stream::Flush() {
  std::string out = Sanitize(pending_);
  pending_.clear();
  return out;
}

}  // namespace kvq::worker
