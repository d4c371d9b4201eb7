// Tokenizer: fixed id sequences on a tiny generated vocabulary, the GPT-2 pre-tokenizer's splits,
// special tokens, the chat template, and round trips of random text and random bytes.
#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "worker/gguf.h"
#include "worker/random_model.h"
#include "worker/tokenizer.h"

namespace kvq::worker {
namespace {

class TokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GgufWriter w;
    WriteTinyTokenizer(&w, 0);
    auto f = GgufFile::FromBytes(w.Serialize());
    ASSERT_TRUE(f.ok()) << f.status();
    auto t = Tokenizer::FromGguf(**f);
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = std::make_unique<Tokenizer>(std::move(*t));
  }
  // The pre-tokenizer's words, joined by '|'.
  std::string Pieces(const std::string& text) {
    std::string out;
    for (const auto& w : tok_->PreTokenize(text)) out += (out.empty() ? "" : "|") + w;
    return out;
  }
  std::unique_ptr<Tokenizer> tok_;
};

int32_t Byte(char c) { return 3 + int32_t(uint8_t(c)); }  // the tiny vocabulary's byte tokens

TEST_F(TokenizerTest, FixedIdSequences) {
  // Merges of " the" give ids 259..261, of " and" 262..264 (the vocabulary is built in order).
  EXPECT_EQ(tok_->Encode(" the and"), (std::vector<int32_t>{261, 264}));
  EXPECT_EQ(tok_->Encode("The"), (std::vector<int32_t>{Byte('T'), tok_->TokenId("he")}));
  EXPECT_EQ(tok_->Encode("x12"), (std::vector<int32_t>{Byte('x'), Byte('1'), Byte('2')}));
  EXPECT_EQ(tok_->Encode("hello world"), (std::vector<int32_t>{tok_->TokenId("hello"), tok_->TokenId("\xc4\xa0world")}));
  EXPECT_EQ(tok_->Encode(""), std::vector<int32_t>{});
  EXPECT_EQ(tok_->vocab_size(), TinyVocabSize(0));
  EXPECT_EQ(tok_->eos_id(), 2);
}

TEST_F(TokenizerTest, PreTokenizerSplits) {
  EXPECT_EQ(Pieces("don't you're"), "don|'t| you|'re");
  EXPECT_EQ(Pieces("a  b"), "a| | b");           // "\s+(?!\S)" leaves the last space to " b"
  EXPECT_EQ(Pieces("ab  "), "ab|  ");            // trailing spaces stay together
  EXPECT_EQ(Pieces("in 2024!"), "in| |2|0|2|4|!");  // digits one by one, the space alone before them
  EXPECT_EQ(Pieces("x\n\ny"), "x|\n|\n|y");      // as the regex backtracks: "\n" then "\n" alone
  EXPECT_EQ(Pieces("hi, \xc3\xa9t\xc3\xa9 ..."), "hi|,| \xc3\xa9t\xc3\xa9| ...");
}

TEST_F(TokenizerTest, SpecialTokensAndChatTemplate) {
  EXPECT_EQ(tok_->Encode("<|im_start|>user"), (std::vector<int32_t>{1, Byte('u'), Byte('s'), Byte('e'), Byte('r')}));
  EXPECT_EQ(tok_->Encode("<|im_start|>", /*parse_special=*/false).size(), 12u);
  EXPECT_TRUE(tok_->IsSpecial(2));
  EXPECT_FALSE(tok_->IsSpecial(Byte('a')));
  EXPECT_EQ(tok_->Decode({1, Byte('h'), 2}), "<|im_start|>h<|im_end|>");
  EXPECT_EQ(tok_->Decode({1, Byte('h'), 2}, /*skip_special=*/true), "h");
  ASSERT_TRUE(tok_->has_chat_template());
  EXPECT_EQ(tok_->ApplyChatTemplate({{"user", "hi"}}),
            "<|im_start|>system\nYou are a tiny test model<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(tok_->ApplyChatTemplate({{"system", "S"}, {"user", "hi"}}),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  // <|im_end|> ends generation as well as the eos token.
  EXPECT_EQ(tok_->stop_ids(), (std::vector<int32_t>{2}));
}

TEST_F(TokenizerTest, RandomTextRoundTrips) {
  const std::vector<std::string> alphabet = {"a", "b", "e", "h", "t", "T", " ", " ", "\n", "\t", "'", "s", "1", "9", ",", ".",
                                             "\xc3\xa9", "\xe2\x80\x99", "\xf0\x9f\x98\x80", "\xe4\xb8\xad", "<|im_end|>", "<", "|"};
  std::mt19937_64 rng(2024);
  for (int iter = 0; iter < 300; ++iter) {
    std::string s;
    const int len = int(rng() % 40);
    for (int i = 0; i < len; ++i) s += alphabet[rng() % alphabet.size()];
    const auto ids = tok_->Encode(s);
    EXPECT_EQ(tok_->Decode(ids), s) << "iteration " << iter;
  }
}

TEST_F(TokenizerTest, RandomBytesRoundTrip) {
  std::mt19937_64 rng(99);
  for (int iter = 0; iter < 200; ++iter) {
    std::string s(size_t(rng() % 64), '\0');
    for (auto& c : s) c = char(rng() & 0xff);
    EXPECT_EQ(tok_->Decode(tok_->Encode(s, false)), s) << "iteration " << iter;
  }
}

TEST(Utf8Stream, HoldsBackSplitCharacters) {
  Utf8Stream u;
  EXPECT_EQ(u.Push("a\xc3"), "a");
  EXPECT_EQ(u.Push("\xa9"), "\xc3\xa9");
  EXPECT_EQ(u.Push("\xf0\x9f"), "");
  EXPECT_EQ(u.Push("\x98"), "");
  EXPECT_EQ(u.Push("\x80z"), "\xf0\x9f\x98\x80z");
  EXPECT_EQ(u.Push("\xe4"), "");
  EXPECT_EQ(u.Flush(), "\xef\xbf\xbd");
  EXPECT_EQ(u.Push("a\x80" "b\xff"), "a\xef\xbf\xbd" "b\xef\xbf\xbd");  // stray bytes are replaced
  EXPECT_EQ(u.Push("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");     // overlong encodings too
}

// SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces with scores.
Tokenizer TinySpm() {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<float> scores = {0, 0, 0};
  std::vector<int> types = {2, 3, 3};
  char buf[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    tokens.push_back(buf);
    scores.push_back(0);
    types.push_back(6);
  }
  const std::string sp = "\xe2\x96\x81";
  for (const auto& [piece, score] : std::vector<std::pair<std::string, float>>{
           {sp, -10}, {"t", -10}, {"h", -10}, {"e", -10}, {sp + "t", -1}, {"he", -2}, {sp + "the", -0.5f}}) {
    tokens.push_back(piece);
    scores.push_back(score);
    types.push_back(1);
  }
  auto t = Tokenizer::FromSpmParts(tokens, scores, types, /*add_space_prefix=*/true);
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(*t);
}

TEST(SpmTokenizer, HighestScoringMergesFirstAndByteFallback) {
  const Tokenizer t = TinySpm();
  // "the" -> "\u2581the": "\u2581t" (-1) merges before "he" (-2), then "\u2581the" (-0.5).
  EXPECT_EQ(t.Encode("the"), (std::vector<int32_t>{265}));
  // "x" is no piece: its byte token <0x78> = 3 + 0x78.
  EXPECT_EQ(t.Encode("the x"), (std::vector<int32_t>{265, 259, 3 + 0x78}));
  EXPECT_EQ(t.Encode("<s>the"), (std::vector<int32_t>{1, 265}));
  EXPECT_EQ(t.Decode({265, 259, 3 + 0x78}), "the x");
  std::mt19937_64 rng(5);
  const std::vector<std::string> alphabet = {"t", "h", "e", " ", "x", "\n", "\xc3\xa9", "\xe4\xb8\xad", "1"};
  for (int iter = 0; iter < 200; ++iter) {
    std::string s;
    for (int i = int(rng() % 20); i > 0; --i) s += alphabet[rng() % alphabet.size()];
    EXPECT_EQ(t.Decode(t.Encode(s)), s) << iter;
  }
}

TEST(TokenizerErrors, UnsupportedModelAndMissingVocabulary) {
  GgufWriter w;
  w.AddString("tokenizer.ggml.model", "rwkv");
  auto f = GgufFile::FromBytes(w.Serialize());
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE(absl::IsUnimplemented(Tokenizer::FromGguf(**f).status()));
  GgufWriter w2;
  w2.AddString("tokenizer.ggml.model", "gpt2");
  auto f2 = GgufFile::FromBytes(w2.Serialize());
  ASSERT_TRUE(f2.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(Tokenizer::FromGguf(**f2).status()));
}

}  // namespace
}  // namespace kvq::worker
